"""What pre-reducing the low-latency combine on the expert side would send and how it would round (CPU, torch only).

Today every (token, top-k) selection travels back to the token's home rank as one BF16 row, and the home sums
the K rows in fp32. If each expert rank summed, per home token, the rows of its own experts (weights times
rows, fp32) and sent one row per (token, rank), a rank would send one row per destination rank a token touches
instead of one per selection. This prints, for DeepSeek-V3's decode shape and R ranks, the rows sent as a share
of the selections, and DeepEP's calc_diff of the result against the home-side fp32 sum, with the partial sums
travelling as BF16 or fp32 (fp32 rows are twice as wide):

    python scripts/probe_ll_prereduce.py [--ranks 2,4,8] [--tokens 128] [--seed 0]
"""
import argparse

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity measure: 1 - 2<x+1, y+1> / (|x+1|^2 + |y+1|^2), in float64."""
    x, y = x.double() + 1, y.double() + 1
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    t, k, h, e = args.tokens, args.topk, args.hidden, args.experts
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    weights = torch.rand(t, k, generator=g)
    rows = torch.randn(t, k, h, generator=g).to(torch.bfloat16)  # expert outputs, one per selection
    weighted = weights[:, :, None] * rows.float()
    home_sum = weighted.sum(1).to(torch.bfloat16)  # what the home computes today
    for num_ranks in (int(r) for r in args.ranks.split(",")):
        owner = idx // (e // num_ranks)
        as_bf16, as_fp32, sent = torch.zeros(t, h), torch.zeros(t, h), 0
        for r in range(num_ranks):
            mine = owner == r
            part = (mine[:, :, None] * weighted).sum(1)
            sent += int(mine.any(1).sum())
            as_bf16 += part.to(torch.bfloat16).float()
            as_fp32 += part
        print(f"{num_ranks} ranks: rows sent {sent} of {t * k} selections ({sent / (t * k):.2f}); calc_diff with "
              f"BF16 partial sums {calc_diff(as_bf16.to(torch.bfloat16), home_sum):.2e}, with fp32 "
              f"{calc_diff(as_fp32.to(torch.bfloat16), home_sum):.2e}")


if __name__ == "__main__":
    main()
