"""Normal mode across nodes: ranks grouped into nodes by FLASHEP_NODE_SIZE (4 ranks as 2 nodes of 2, 8 ranks
as 2 nodes of 4). Runs test_normal's body with the internode expectations: `num_tokens_per_rdma_rank`,
10-element handles whose element -4 is the per-source prefix sum, group-limited gating (spec 9), and
combine with two biases checked for every input, all against flashep.reference.
"""
import pytest
import torch

from harness import gpu_world, run_ranks
from test_normal import NormalCase, normal_body

CPU_CASES = (
    NormalCase("gated_1_of_2_nodes", tokens=(24,), topk_groups=1),
    NormalCase("gated_2_of_2_uneven", tokens=(9, 0, 30, 14), topk_groups=2, minus_one=0.2,
               topk_dtype=torch.int32, expert_alignment=2, streams="diagonal"),
)
GPU_CASES = (
    NormalCase("deepseek_v3_gated", tokens=(4096,), hidden=7168, num_topk=8, num_experts=256, topk_groups=1),
    NormalCase("h4096_uneven", tokens=(3000, 1, 4096, 0), hidden=4096, num_topk=6, num_experts=128,
               topk_groups=2, minus_one=0.1, streams="diagonal"),
)


@pytest.mark.parametrize("world_size, node_size", [(4, 2), (8, 4)], ids=["2x2", "2x4"])
def test_internode_cpu(world_size, node_size, seed):
    run_ranks(world_size, normal_body, CPU_CASES, seed, True, backend="collective",
              env={"FLASHEP_NODE_SIZE": str(node_size)})


@pytest.mark.parametrize("world_size", [gpu_world(4)])
def test_internode_gpu(world_size, seed):
    run_ranks(world_size, normal_body, GPU_CASES, seed, True, backend="collective", device="cuda",
              env={"FLASHEP_NODE_SIZE": "2"})
