"""Link probe: Triton remote stores (push), TMA stores (tma), remote loads (pull) over NVLink symmetric memory.

Every rank moves `rows` rows of `hidden` bf16 to/from every peer at once (all-to-all pattern), with a
given number of programs (SMs), tile shape and warps. Prints remote GB/s per rank (slowest rank).
Also checks the heap, `%globaltimer` and a cross-GPU flag wait.

    python scripts/probe_links.py [--ranks N] [--rows 3600] [--hidden 7168] [--modes push,tma,pull,local]
                                  [--programs 12,24,48]
"""
import argparse
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import local_ranks
from flashep.kernels.sync import now_ns, signal, tag, wait_tag
from flashep.transport.heap import SymmetricHeap


@triton.jit
def _program_rows(nrows):
    """This program's contiguous share [r0, r1) of nrows rows."""
    per = tl.cdiv(nrows, tl.num_programs(0))
    r0 = tl.program_id(0) * per
    return r0, tl.minimum(r0 + per, nrows)


@triton.jit
def push_kernel(src, peer_bases, region_off, rank, R, nrows, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    r0, r1 = _program_rows(nrows)
    for t in range(r0, r1, BT):
        rows = t + tl.arange(0, BT)
        rmask = rows < r1
        for h in range(0, H, BH):
            cols = h + tl.arange(0, BH)
            m = rmask[:, None] & (cols[None, :] < H)
            v = tl.load(src + rows[:, None] * H + cols[None, :], mask=m)
            for p in range(1, R):
                peer = (rank + p) % R
                base = (tl.load(peer_bases + peer) + region_off).to(tl.pointer_type(tl.bfloat16))
                tl.store(base + (rank * nrows + rows[:, None]) * H + cols[None, :], v, mask=m)


@triton.jit
def push_tma_kernel(src, peer_bases, region_off, rank, R, nrows, H: tl.constexpr, BT: tl.constexpr,
                    BH: tl.constexpr):
    """As push_kernel, but the remote writes are TMA tensor stores (box [BT, min(BH, 256)])."""
    BOX: tl.constexpr = BH if BH < 256 else 256
    r0, r1 = _program_rows(nrows)
    for p in range(1, R):
        peer = (rank + p) % R
        base = (tl.load(peer_bases + peer) + region_off).to(tl.pointer_type(tl.bfloat16)) + rank * nrows * H
        desc = tl.make_tensor_descriptor(tl.multiple_of(base, 16), shape=[r1, H], strides=[H, 1],
                                         block_shape=[BT, BOX])
        for t in range(r0, r1, BT):
            rows = t + tl.arange(0, BT)
            rmask = rows < r1
            for h in range(0, H, BOX):
                cols = h + tl.arange(0, BOX)
                v = tl.load(src + rows[:, None] * H + cols[None, :], mask=rmask[:, None] & (cols[None, :] < H))
                desc.store([t, h], v)


@triton.jit
def pull_kernel(dst, peer_bases, region_off, rank, R, nrows, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    r0, r1 = _program_rows(nrows)
    for p in range(1, R):
        peer = (rank + p) % R
        base = (tl.load(peer_bases + peer) + region_off).to(tl.pointer_type(tl.bfloat16))
        for t in range(r0, r1, BT):
            rows = t + tl.arange(0, BT)
            rmask = rows < r1
            for h in range(0, H, BH):
                cols = h + tl.arange(0, BH)
                m = rmask[:, None] & (cols[None, :] < H)
                v = tl.load(base + (rank * nrows + rows[:, None]) * H + cols[None, :], mask=m)
                tl.store(dst + (p * nrows + rows[:, None]) * H + cols[None, :], v, mask=m)


@triton.jit
def local_copy_kernel(src, dst, nrows, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    r0, r1 = _program_rows(nrows)
    for t in range(r0, r1, BT):
        rows = t + tl.arange(0, BT)
        rmask = rows < r1
        for h in range(0, H, BH):
            cols = h + tl.arange(0, BH)
            m = rmask[:, None] & (cols[None, :] < H)
            v = tl.load(src + rows[:, None] * H + cols[None, :], mask=m)
            tl.store(dst + rows[:, None] * H + cols[None, :], v, mask=m)


@triton.jit
def timer_kernel(out):
    t0 = now_ns(True)
    acc = 0
    for i in range(0, 100000):
        acc += i
    t1 = now_ns(True)
    tl.store(out, t0)
    tl.store(out + 1, t1)
    tl.store(out + 2, acc)


@triton.jit(do_not_specialize=["rank", "peer", "epoch"])
def flag_kernel(peer_bases, flag_off, rank, peer, epoch, budget, out):
    # write our flag slot on the peer, then wait for the peer's slot on us
    dst = (tl.load(peer_bases + peer) + flag_off).to(tl.pointer_type(tl.int64)) + rank
    wanted = tag(epoch.to(tl.int64))
    signal(dst, wanted << 32)
    mine = (tl.load(peer_bases + rank) + flag_off).to(tl.pointer_type(tl.int64)) + peer
    ok = wait_tag(mine, wanted, wanted, budget, True)
    tl.store(out, ok.to(tl.int64))


def time_kernel(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    t = torch.tensor([start.elapsed_time(end) / iters / 1e3], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(rank, world, args):
    H, rows = args.hidden, args.rows
    region = world * rows * H * 2
    heap = SymmetricHeap(dist.group.WORLD, region + 4096, torch.device("cuda", rank))
    flag_off = region
    out = torch.zeros(4, dtype=torch.int64, device="cuda")
    timer_kernel[(1,)](out)
    torch.cuda.synchronize()
    t0, t1 = out[0].item(), out[1].item()
    peer = (rank + 1) % world
    flag_kernel[(1,)](heap.peer_bases, flag_off, rank, peer, 5, int(5e9), out)
    torch.cuda.synchronize()
    if rank == 0:
        print(f"globaltimer ok: {t1 - t0} ns for a 100k loop; flag wait returned {out[0].item()} (expect 1)")
    src = torch.randn(rows, H, device="cuda").to(torch.bfloat16)
    dst = torch.empty(world * rows, H, device="cuda", dtype=torch.bfloat16)
    remote_bytes = (world - 1) * rows * H * 2
    results = []
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    for mode in args.modes.split(","):
        for programs in [int(p) for p in args.programs.split(",")]:
            for bt, bh, warps in ((4, 1024, 4), (4, 2048, 8), (8, 1024, 8), (8, 2048, 16), (16, 1024, 16)):
                if mode == "push":
                    fn = lambda: push_kernel[(programs,)](src, heap.peer_bases, 0, rank, world, rows, H=H, BT=bt,
                                                          BH=bh, num_warps=warps)
                elif mode == "tma":
                    fn = lambda: push_tma_kernel[(programs,)](src, heap.peer_bases, 0, rank, world, rows, H=H,
                                                              BT=bt, BH=bh, num_warps=warps)
                elif mode == "pull":
                    fn = lambda: pull_kernel[(programs,)](dst, heap.peer_bases, 0, rank, world, rows, H=H, BT=bt,
                                                          BH=bh, num_warps=warps)
                else:
                    fn = lambda: local_copy_kernel[(programs,)](src, dst, rows, H=H, BT=bt, BH=bh, num_warps=warps)
                t = time_kernel(fn)
                nbytes = remote_bytes if mode != "local" else rows * H * 2
                results.append((mode, programs, bt, bh, warps, t * 1e6, nbytes / t / 1e9))
    # correctness of push: peer p's region slot `rank` holds our src
    dist.barrier()
    push_kernel[(24,)](src, heap.peer_bases, 0, rank, world, rows, H=H, BT=4, BH=2048, num_warps=8)
    torch.cuda.synchronize()
    dist.barrier()
    got = heap.view(0, (world, rows, H), torch.bfloat16)
    srcs = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(srcs, src)
    ok = all(torch.equal(got[s], srcs[s]) for s in range(world) if s != rank)
    got.zero_()
    torch.cuda.synchronize()
    dist.barrier()
    push_tma_kernel[(24,)](src, heap.peer_bases, 0, rank, world, rows, H=H, BT=4, BH=1024, num_warps=8)
    torch.cuda.synchronize()
    dist.barrier()
    tma_ok = all(torch.equal(got[s], srcs[s]) for s in range(world) if s != rank)
    if rank == 0:
        print(f"push correctness: {ok}; TMA push correctness: {tma_ok}")
        print(f"{'mode':6} {'progs':>5} {'BT':>3} {'BH':>5} {'warps':>5} {'us':>9} {'GB/s':>8}  (remote bytes per rank; local = copy bytes)")
        for r in results:
            print(f"{r[0]:6} {r[1]:5d} {r[2]:3d} {r[3]:5d} {r[4]:5d} {r[5]:9.1f} {r[6]:8.1f}")
    dist.barrier()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=torch.cuda.device_count())
    p.add_argument("--rows", type=int, default=3600)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--modes", default="push,tma,pull,local")
    p.add_argument("--programs", default="12,24,48")
    args = p.parse_args()
    local_ranks.spawn(worker, args.ranks, args)


if __name__ == "__main__":
    main()
