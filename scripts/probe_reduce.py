"""The combine's reduction alone, on one GPU: how fast `_reduce_tokens` reads and sums the rows of several
ranks per program, per tuning setting, without links or peers.

    python scripts/probe_reduce.py [--ranks 4] [--tokens 4096] [--hidden 7168] [--programs 13,24]
                                   [--settings "stages=1,block_h=1024" "stages=3,block_h=512" ...]

The copy-engine combine's reduction kernel (`ep_combine_reduce_kernel`) runs as rank 0 of a group of
`--ranks`, with every peer's rows already in a local tensor and every flag already up, so the kernel does
nothing but the reduction: per home token, the rows of the ranks it went to (each with probability
1 - C(E - E/R, k) / C(E, k), top-8 of 256 experts) summed in float32, plus the summed top-k weights. Each
setting is checked bit for bit against torch (same order, same rounding) before it is timed. Printed per
setting: GPU time per call (CUDA events around back-to-back calls), GB/s of rows read plus written, and that
per program.
"""
import argparse
import statistics

import torch
import triton

from flashep.kernels import normal as kernels

MAX_PARTS = kernels.MAX_COPY_PARTS


def routing(num_tokens, num_ranks, num_topk, num_experts, device):
    """Rank 0's send_head [T, R] (a token's index among the tokens sent to rank j, or -1) and the counts."""
    idx = torch.rand(num_tokens, num_experts, device=device).topk(num_topk, dim=1).indices
    in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
    in_rank.scatter_(1, idx // (num_experts // num_ranks), True)
    head = torch.where(in_rank, in_rank.int().cumsum(0) - 1, -1).int()
    return head, in_rank.sum(0).tolist()


def reference(x, rows, weights, peer_weights, head, sent, num_ranks):
    slot_base = [0] * num_ranks
    for j in range(2, num_ranks):
        slot_base[j] = slot_base[j - 1] + sent[j - 1]
    out = torch.zeros(head.size(0), x.size(1), dtype=torch.float32, device=x.device)
    out_w = torch.zeros(head.size(0), weights.size(1), dtype=torch.float32, device=x.device)
    for j in range(num_ranks):
        has = head[:, j] >= 0
        where = head[has, j].long()
        src, src_w = (x, weights) if j == 0 else (rows, peer_weights)
        base = 0 if j == 0 else slot_base[j]
        out[has] += src[base + where].float()
        out_w[has] += src_w[base + where]
    return out.to(torch.bfloat16), out_w


def run(args, setting, data, device):
    x, rows, weights, peer_weights, head, sent = data
    num_tokens, hidden = head.size(0), x.size(1)
    num_topk = weights.size(1)
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=device)
    out_w = torch.empty(num_tokens, num_topk, dtype=torch.float32, device=device)
    prefix = torch.tensor([sent], dtype=torch.int32, device=device).expand(args.ranks, -1).contiguous()
    flags = torch.full((args.ranks * MAX_PARTS,), 5, dtype=torch.int32, device=device)
    err = torch.zeros(2, dtype=torch.int64, device=device)  # device copy of 'failed' = 0: the waits pass at once
    num_channels = setting["programs"] // 2 if setting["programs"] > 1 else 1
    dummy = torch.empty(1, dtype=torch.bfloat16, device=device)

    def call():
        kernels.ep_combine_reduce_kernel[(setting["programs"],)](
            x, weights, dummy, dummy, head, prefix, out, out_w, rows, peer_weights, flags, 5, 6, err, 0, num_tokens,
            num_channels, -(-num_tokens // num_channels), 1, num_topk, 10**9, NUM_RANKS=args.ranks,
            R_PAD=triton.next_power_of_2(args.ranks), MAX_PARTS=MAX_PARTS, HIDDEN=hidden,
            K_PAD=triton.next_power_of_2(num_topk),
            BLOCK_T=setting["block_t"], REDUCE_BLOCK_H=setting["block_h"], HAS_WEIGHTS=True, HAS_BIAS0=False,
            HAS_BIAS1=False, USE_TIMER=device.type == "cuda", STAGES=setting["stages"], num_warps=setting["warps"])

    call()
    expect, expect_w = reference(x, rows, weights, peer_weights, head, sent, args.ranks)  # ordered after the call
    same = torch.equal(out, expect) and torch.equal(out_w, expect_w)
    if device.type != "cuda":  # a check of this script under TRITON_INTERPRET=1, nothing timed
        print(f"{describe(setting):48s} {'ok' if same else 'WRONG'}", flush=True)
        return same
    times = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.calls):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / args.calls)
    us = statistics.median(times)
    moved = (int((head >= 0).sum()) + num_tokens) * hidden * 2  # rows read + rows written
    gbs = moved / us / 1e3
    print(f"{describe(setting):48s} {'ok' if same else 'WRONG':5s} {us:8.1f} us  {gbs:7.1f} GB/s  "
          f"{gbs / setting['programs']:5.1f} GB/s per program", flush=True)
    return same


def describe(setting):
    return ",".join(f"{k}={v}" for k, v in setting.items())


def parse(text, programs):
    setting = {"stages": 1, "block_h": 1024, "block_t": 16, "warps": 8, "programs": programs}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key not in setting:
            raise SystemExit(f"unknown key {key!r} (one of {', '.join(setting)})")
        setting[key] = int(value)
    return setting


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--programs", default="13", help="comma-separated program counts")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="check this script under TRITON_INTERPRET=1")
    parser.add_argument("--settings", nargs="*", default=["stages=3,block_h=256,block_t=32", "stages=1"])
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    torch.manual_seed(0)
    head, sent = routing(args.tokens, args.ranks, 8, 256, device)
    peer_rows = sum(sent[1:])
    data = (torch.randn(sent[0], args.hidden, device=device).to(torch.bfloat16),
            torch.randn(peer_rows, args.hidden, device=device).to(torch.bfloat16),
            torch.rand(sent[0], 8, device=device), torch.rand(peer_rows, 8, device=device), head, sent)
    print(f"rank 0 of {args.ranks}, {args.tokens} tokens, hidden {args.hidden}, rows per rank {sent}")
    ok = True
    for programs in map(int, args.programs.split(",")):
        for text in args.settings:
            ok &= run(args, parse(text, programs), data, device)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
