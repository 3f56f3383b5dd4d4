"""flashep.reference (the oracle) against hand-computed cases."""
import pytest
import torch

from flashep import reference

BF16 = torch.bfloat16


def _rows(values, hidden=4):
    """bf16 [len(values), hidden] with row i filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).expand(-1, hidden).to(BF16).contiguous()


# ---- layout --------------------------------------------------------------------------------------------
def test_layout_counts_distinct_tokens_and_selections():
    # 2 ranks x 2 experts; token 2 selects nothing, token 3 picks two experts of rank 1
    topk = torch.tensor([[0, 3], [1, -1], [-1, -1], [2, 3]])
    per_rank, per_node, per_expert, in_rank = reference.layout(topk, num_experts=4, num_ranks=2)
    assert in_rank.tolist() == [[True, True], [True, False], [False, False], [False, True]]
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == [2, 2]
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == [1, 1, 1, 2]
    assert per_node is None


def test_layout_nodes():
    # 4 ranks as 2 nodes of 2, 1 expert per rank
    topk = torch.tensor([[0, 1], [0, 2], [3, -1], [-1, -1], [1, 3]], dtype=torch.int32)
    per_rank, per_node, per_expert, _ = reference.layout(topk, num_experts=4, num_ranks=4, node_size=2)
    assert per_rank.tolist() == [2, 2, 1, 2]
    assert per_node.dtype == torch.int32 and per_node.tolist() == [3, 3]
    assert per_expert.tolist() == [2, 2, 1, 2]


# ---- normal dispatch -------------------------------------------------------------------------------------
def _two_rank_routing():
    # 2 ranks, 4 experts (2 per rank)
    topk = [torch.tensor([[3, 0], [1, -1], [2, 3]]),  # rank 0: tokens 0..2
            torch.tensor([[0, 2], [-1, -1]])]  # rank 1: tokens 0..1
    weights = [torch.tensor([[0.5, 1.5], [2.0, 9.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])]
    return topk, weights


def test_dispatch_rows_order_and_topk_rewrite():
    topk, weights = _two_rank_routing()
    xs = [_rows([10, 11, 12]), _rows([20, 21])]
    to0, to1 = reference.dispatch(xs, topk, weights, num_experts=4)
    # rank 0 gets tokens with experts 0/1: rank 0's tokens 0, 1, then rank 1's token 0
    assert to0.recv_x[:, 0].tolist() == [10, 11, 20]
    assert to0.recv_src_rank.tolist() == [0, 0, 1] and to0.recv_src_idx.tolist() == [0, 1, 0]
    assert to0.rank_prefix.dtype == torch.int32 and to0.rank_prefix.tolist() == [2, 3]
    assert to0.recv_topk_idx.tolist() == [[-1, 0], [1, -1], [0, -1]]
    assert to0.recv_topk_weights.tolist() == [[0.0, 1.5], [2.0, 0.0], [5.0, 0.0]]
    assert to0.num_recv_tokens_per_expert == [2, 1]
    # rank 1 gets experts 2/3: rank 0's tokens 0, 2, then rank 1's token 0 (local ids 0, 1)
    assert to1.recv_x[:, 0].tolist() == [10, 12, 20]
    assert to1.recv_src_idx.tolist() == [0, 2, 0] and to1.rank_prefix.tolist() == [2, 3]
    assert to1.recv_topk_idx.tolist() == [[1, -1], [0, 1], [-1, 0]]
    assert to1.recv_topk_weights.tolist() == [[0.5, 0.0], [3.0, 4.0], [0.0, 6.0]]
    assert to1.num_recv_tokens_per_expert == [2, 2]
    assert to1.recv_x_scales is None


def test_dispatch_alignment_dtype_and_no_weights():
    topk, _ = _two_rank_routing()
    topk = [t.to(torch.int32) for t in topk]
    to0, to1 = reference.dispatch([_rows([1, 2, 3]), _rows([4, 5])], topk, None, num_experts=4, expert_alignment=4)
    assert to0.num_recv_tokens_per_expert == [4, 4] and to1.num_recv_tokens_per_expert == [4, 4]
    assert to0.recv_topk_idx.dtype == torch.int32 and to0.recv_topk_weights is None


def test_dispatch_fp8_copies_bytes_and_makes_scales_row_major():
    topk, _ = _two_rank_routing()
    data = [torch.randn(3, 128).to(torch.float8_e4m3fn), torch.randn(2, 128).to(torch.float8_e4m3fn)]
    scales = [torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).T.contiguous().T,
              torch.tensor([[7, 8], [9, 10]], dtype=torch.int32).T.contiguous().T]
    # mixed scale dtypes across ranks are not a real case, but show the bytes are never interpreted
    to0, _ = reference.dispatch([(data[0], scales[0]), (data[1], scales[1].view(torch.float32))], topk, None, 4)
    assert torch.equal(to0.recv_x.view(torch.uint8),
                       torch.cat([data[0][:2], data[1][:1]]).view(torch.uint8))
    assert to0.recv_x_scales.is_contiguous()
    assert to0.recv_x_scales[:2].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert torch.equal(to0.recv_x_scales[2].view(torch.int32), torch.tensor([7, 8], dtype=torch.int32))


def test_dispatch_rank_without_tokens():
    topk = [torch.tensor([[1]]), torch.zeros(0, 1, dtype=torch.int64)]
    to0, to1 = reference.dispatch([_rows([5.0]), torch.zeros(0, 4, dtype=BF16)], topk, None, num_experts=2)
    assert to0.recv_x.shape == (0, 4) and to0.rank_prefix.tolist() == [0, 0]
    assert to1.recv_x[:, 0].tolist() == [5.0] and to1.rank_prefix.tolist() == [1, 1]
    assert to1.num_recv_tokens_per_expert == [1]


# ---- normal combine: the canonical fp32 order is observable in bf16 -------------------------------------
def test_combine_sums_ranks_in_ascending_order():
    # 3 ranks, 1 expert each; rank 0's only token goes to every rank; the other ranks have no tokens
    topk = [torch.tensor([[0, 1, 2]]), torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)]
    xs = [_rows([1.0]), _rows([-1.0]), _rows([2.0**-30])]
    (out, w), _, _ = reference.combine(xs, topk, num_experts=3)
    # (1 + -1) + 2^-30 = 2^-30, whereas rank 2 first would give (2^-30 + -1) + 1 = 0
    assert out.dtype == BF16 and out[0].tolist() == [2.0**-30] * 4 and w is None


def test_combine_adds_biases_first():
    topk = [torch.tensor([[0]]), torch.zeros(0, 1, dtype=torch.int64)]
    xs = [_rows([2.0**-30]), torch.zeros(0, 4, dtype=BF16)]
    biases = [(_rows([1.0]), _rows([-1.0])), (None, None)]
    (out, _), (empty, _) = reference.combine(xs, topk, num_experts=2, biases=biases)
    # (0 + 1 + -1) + 2^-30 = 2^-30; the rows first would give (2^-30 + 1) - 1 = 0
    assert out[0].tolist() == [2.0**-30] * 4 and empty.shape == (0, 4)


def test_combine_rounds_once_to_bf16():
    # 1 + 2^-8 is halfway between two bf16 values; 3 * 2^-26 is below half a float32 ulp of 1 + 2^-8,
    # so the fp32 sum stays at the tie, which rounds to even (1.0)
    topk = [torch.tensor([[0, 1, 2]]), torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)]
    xs = [_rows([2.0**-8]), _rows([3 * 2.0**-26]), _rows([3 * 2.0**-26])]
    (out, _), _, _ = reference.combine(xs, topk, num_experts=3, biases=[(_rows([1.0]), None), None, None])
    assert out[0].tolist() == [1.0] * 4


def test_combine_weights_and_tokens_sent_nowhere():
    topk, weights = _two_rank_routing()
    xs = [_rows([10, 11, 12]), _rows([20, 21])]
    expects = reference.dispatch(xs, topk, weights, num_experts=4)
    out = reference.combine([e.recv_x for e in expects], topk, 4,
                            topk_weights=[e.recv_topk_weights for e in expects],
                            biases=[(None, _rows([1, 1, 1])), (_rows([0.5, 0.5]), None)])
    # rank 0: token 0 went to both ranks, token 1 to rank 0, token 2 to rank 1; plus bias1 = 1
    assert out[0][0][:, 0].tolist() == [21, 12, 13]
    assert torch.equal(out[0][1], weights[0] * torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    # rank 1: token 0 went to both ranks, token 1 nowhere (bias only)
    assert out[1][0][:, 0].tolist() == [40.5, 0.5]
    assert out[1][1].tolist() == [[5.0, 6.0], [0.0, 0.0]]


# ---- low-latency quantization ----------------------------------------------------------------------------
def _groups_with_amax(amaxes):
    """bf16 [1, 128 * len(amaxes)]: group g holds amax[g] at channel 0 and amax[g] / 2 at channel 1."""
    x = torch.zeros(1, 128 * len(amaxes))
    for g, a in enumerate(amaxes):
        x[0, 128 * g] = a
        x[0, 128 * g + 1] = -a / 2
    return x.to(BF16)


def test_quantize_plain_scales():
    x = _groups_with_amax([448.0, 1.0, 0.0, 7.0])
    q, s = reference.quantize_low_latency(x, round_scale=False, use_ue8m0=False)
    assert s.dtype == torch.float32 and s.shape == (1, 4)
    assert s[0].tolist() == [1.0, torch.tensor(1 / 448).item(), torch.tensor(1e-4 / 448).item(),
                             torch.tensor(7 / 448).item()]
    assert q[0, [0, 1, 128, 129, 384, 385]].float().tolist() == [448, -224, 448, -224, 448, -224]
    assert torch.count_nonzero(q[0, 256:384].float()) == 0


def test_quantize_round_scale_exact_at_powers_of_two():
    # amax / 448 = 1 -> e = 0; = 2^-3 -> e = -3 (exact powers of two keep their exponent);
    # 450 / 448 just above 1 -> e = 1; 100 / 448 = 0.223 -> e = -2; zero group: 1e-4 / 448 -> e = -22
    x = _groups_with_amax([448.0, 56.0, 450.0, 100.0, 0.0, 3.5, 448 * 2.0**-10, 448 * 2.0**10])
    q, s = reference.quantize_low_latency(x, round_scale=True, use_ue8m0=False)
    exponents = [0, -3, 1, -2, -22, -7, -10, 10]
    assert s[0].tolist() == [2.0**e for e in exponents]
    # 450 / 2 = 225 -> 224 (e4m3 steps by 16 in [128, 256)); 100 * 4 = 400 ties 384 / 416 -> even 384
    assert q[0, [0, 128, 256, 384]].float().tolist() == [448, 448, 224, 384]
    q8, words = reference.quantize_low_latency(x, round_scale=True, use_ue8m0=True)
    assert torch.equal(q8.view(torch.uint8), q.view(torch.uint8))
    # UE8M0 bytes e + 127, group 4p + j in byte j of word p
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    packed = [sum((e + 127) << (8 * j) for j, e in enumerate(exponents[4 * p:4 * p + 4])) for p in range(2)]
    assert words[0].tolist() == [w - 2**32 if w >= 2**31 else w for w in packed]


def test_quantize_rounds_to_nearest_even():
    # amax 448 -> scale 1: 0.5078125 lies between e4m3 values 0.5 and 0.5625 and rounds to 0.5; in [8, 16)
    # e4m3 steps by 1, so the ties 12.5 and 13.5 round to the even mantissas 12 and 14
    x = _groups_with_amax([448.0])
    x[0, 2], x[0, 3], x[0, 4] = 0.5078125, 12.5, 13.5
    q, _ = reference.quantize_low_latency(x, round_scale=False, use_ue8m0=False)
    assert q[0, 2:5].float().tolist() == [0.5, 12.0, 14.0]


# ---- low-latency dispatch and combine -------------------------------------------------------------------
def test_low_latency_dispatch_rows_per_selection():
    topk = [torch.tensor([[1, 2], [0, 1]]), torch.tensor([[1, -1], [3, 0], [2, 1]])]
    xs = [_rows([1, 2], 128), _rows([3, 4, 5], 128)]
    to0, to1 = reference.low_latency_dispatch(xs, topk, num_experts=4, use_fp8=False)
    assert to0.recv_count.dtype == torch.int32 and to0.recv_count.tolist() == [2, 4]
    assert to0.src_rank[1].tolist() == [0, 0, 1, 1] and to0.src_idx[1].tolist() == [0, 1, 0, 2]
    assert to0.data[1][:, 0].tolist() == [1, 2, 3, 5] and to0.scales is None
    assert to0.src_rank[0].tolist() == [0, 1] and to0.src_idx[0].tolist() == [1, 1]
    assert to1.recv_count.tolist() == [2, 1] and to1.src_idx[0].tolist() == [0, 2]
    fp8 = reference.low_latency_dispatch(xs, topk, num_experts=4, use_fp8=True)[0]
    assert fp8.data[1].dtype == torch.float8_e4m3fn and fp8.scales[1].shape == (4, 1)
    assert fp8.scales[1][:, 0].tolist() == [torch.tensor(v / 448).item() for v in (1.0, 2.0, 3.0, 5.0)]


def _handle(src_info_rows, blocks, t_max, hidden, num_experts):
    """Low-latency handle from per-expert row lists and per-(expert, source) (begin, count)."""
    num_local, num_ranks = len(blocks), len(blocks[0])
    src_info = torch.full((num_local, num_ranks * t_max), -1, dtype=torch.int32)
    layout_range = torch.zeros(num_local, num_ranks, dtype=torch.int64)
    for i, rows in enumerate(src_info_rows):
        src_info[i, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
        for s, (begin, count) in enumerate(blocks[i]):
            layout_range[i, s] = (begin << 32) | count
    return src_info, layout_range, t_max, hidden, num_experts


def test_low_latency_combine_weighted_in_topk_order():
    # 2 ranks, 2 experts (1 per rank), T_max 2; rank 0 has tokens [e1, e0] and [e0, -1]; rank 1 has [e0, e1]
    topk = [torch.tensor([[1, 0], [0, -1]]), torch.tensor([[0, 1]])]
    weights = [torch.tensor([[0.5, 2.0], [3.0, 100.0]]), torch.tensor([[1.0, -1.0]])]
    # owner 0 (expert 0) lists rank 1's block first, and rank 0's tokens in reverse order
    h0 = _handle([[0, 1, 0]], [[(1, 2), (0, 1)]], 2, 4, 2)
    h1 = _handle([[0, 0]], [[(0, 1), (1, 1)]], 2, 4, 2)
    y0 = torch.zeros(1, 4, 4, dtype=BF16)
    y0[0, :3] = _rows([30, 20, 40])  # row 0: (rank 1, token 0); row 1: (rank 0, token 1); row 2: (rank 0, token 0)
    y1 = torch.zeros(1, 4, 4, dtype=BF16)
    y1[0, :2] = _rows([7, 9])  # row 0: (rank 0, token 0); row 1: (rank 1, token 0)
    out0, out1 = reference.low_latency_combine([y0, y1], [h0, h1], topk, weights, num_experts=2)
    assert out0[:, 0].tolist() == [0.5 * 7 + 2.0 * 40, 3.0 * 20]
    assert out1[:, 0].tolist() == [1.0 * 30 - 9]


def test_low_latency_combine_no_fused_multiply_add():
    # k = 0: acc = 1 * -(1 + 2^-7). k = 1: w * y = (1 + 2^-23)(1 + 2^-7) = 1 + 2^-7 + 2^-23 + 2^-30 rounds to
    # 1 + 2^-7 + 2^-23 in fp32, so acc = 2^-23; a fused multiply-add would keep 2^-23 + 2^-30
    topk = [torch.tensor([[0, 1]])]
    weights = [torch.tensor([[1.0, 1 + 2.0**-23]])]
    h = _handle([[0], [0]], [[(0, 1)], [(0, 1)]], 1, 4, 2)
    y = torch.zeros(2, 1, 4, dtype=BF16)
    y[0, 0] = -(1 + 2.0**-7)
    y[1, 0] = 1 + 2.0**-7
    out, = reference.low_latency_combine([y], [h], topk, weights, num_experts=2)
    assert out[0].tolist() == [2.0**-23] * 4


def test_low_latency_combine_missing_row_is_an_error():
    topk = [torch.tensor([[0]])]
    h = _handle([[]], [[(0, 0)]], 1, 4, 1)
    with pytest.raises(AssertionError, match="no row for expert 0"):
        reference.low_latency_combine([torch.zeros(1, 1, 4, dtype=BF16)], [h], topk, [torch.ones(1, 1)], 1)


def test_canonical_low_latency_rows():
    # one local expert, 2 ranks: rank 1's block [0, 2) holds tokens 3, 1; rank 0's block [2, 3) token 0
    h = _handle([[3, 1, 0]], [[(2, 1), (0, 2)]], 4, 4, 2)
    x = torch.zeros(1, 8, 4, dtype=BF16)
    x[0, :3] = _rows([13, 11, 10])
    rows = reference.canonical_low_latency_rows(x, torch.tensor([3], dtype=torch.int32), h, num_ranks=2)
    assert rows.src_rank[0].tolist() == [0, 1, 1] and rows.src_idx[0].tolist() == [0, 1, 3]
    assert rows.data[0][:, 0].tolist() == [10, 11, 13]
    bad = _handle([[3, 1, 0]], [[(3, 1), (0, 2)]], 4, 4, 2)  # a gap at row 2
    with pytest.raises(AssertionError, match="tile"):
        reference.canonical_low_latency_rows(x, torch.tensor([3], dtype=torch.int32), bad, num_ranks=2)
    with pytest.raises(AssertionError, match="recv_count"):
        reference.canonical_low_latency_rows(x, torch.tensor([4], dtype=torch.int32), h, num_ranks=2)
