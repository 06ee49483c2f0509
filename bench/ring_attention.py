"""Benchmark ring attention prefill (attention alone) on N GPUs.

For each total length T (causal, bf16, 32 query heads, 8 KV heads, head dim 128) it times:
  * ours:  shared.attention.ring.ring_attention over the N ranks, zigzag layout
           (chunk T / 2N by default: member i holds chunks i and 2N-1-i);
  * sdpa:  single-GPU SDPA (cuDNN backend) on rank 0, causal over T / sqrt(N) tokens: the
           same FLOPs one ring member does, so its TFLOP/s is what a member could reach;
  * peer:  PyTorch's own context parallel (torch.distributed.tensor.experimental.context_parallel)
           on the same shapes, same zigzag ("head-tail") layout.
Causal FLOPs = 4 * T^2 * H * d / 2; TFLOP/s per GPU divides them by N. Times are medians of
CUDA-event timings after warm-up, the slowest rank's. With --scaling it also times one fixed
problem (512K) on 1 GPU and on N GPUs.

With --window (and --sinks / --stride) "ours" runs that sparse pattern (shared/attention/pattern.py)
and is compared with our full causal ring on the same tensors: time and K/V bytes sent, summed
over the ranks (a sparse pattern sends each member only the rows its queries see). Its TFLOP/s
still count the causal FLOPs: a causal-equivalent rate.

    torchrun --nproc-per-node 2 bench/ring_attention.py --lengths 131072,524288,1048576 --scaling --out ring.json
    python bench/ring_attention.py --nproc 2 ...           # spawns its own processes
    python bench/ring_attention.py --device cpu --tiny     # smoke test (gloo, tiny shapes)
    python bench/ring_attention.py --device cpu --nproc 2 --dtype float32 --lengths 4096 --window 256 --sinks 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.*

from shared.attention.layout import zigzag_segments  # noqa: E402
from shared.attention.local import attention_plain  # noqa: E402
from shared.attention.pattern import KeyPattern  # noqa: E402
from shared.attention.ring import RingStep, ring_attention  # noqa: E402


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int


FULL = Shape(heads=32, kv_heads=8, head_dim=128)
TINY = Shape(heads=4, kv_heads=2, head_dim=16)
DEFAULT_LENGTHS = "131072,524288,1048576"
TINY_LENGTHS = "256,1000"
SCALING_LENGTH = 524288
TINY_SCALING_LENGTH = 512
# Query rows per rank checked against plain attention (positions spread over the rank's rows).
CHECK_ROWS = 16
SEQUENCE_ALIGN = 256  # the single-GPU baseline's length is rounded to this
DIST_TIMEOUT_S = 600


def causal_flops(tokens: int, shape: Shape) -> float:
    return 4 * tokens * tokens * shape.heads * shape.head_dim / 2


# ---- timing ----------------------------------------------------------------------------------


def median_seconds(fn, device: torch.device, warmup: int, iters: int, *, synced: bool = True) -> float:
    """Median time of fn() on this rank; synced: ranks start each iteration together."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if synced and dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---- the three contenders --------------------------------------------------------------------


def rows_of(segments, device) -> torch.Tensor:
    return torch.cat([torch.arange(s, e, device=device) for s, e in segments])


def time_ring(q, k, v, scale, world: int, chunk: int, args, device, pattern: KeyPattern | None = None):
    """Our ring on all ranks, with `pattern` or causal: (seconds, this rank's out [T/N, H, d], max
    error of sampled rows, K/V bytes one call sends over all ranks)."""
    rank = dist.get_rank()
    segments = zigzag_segments(q.shape[0], chunk, world)
    rows = rows_of(segments[rank], device)
    q_l, k_l, v_l = q[rows].contiguous(), k[rows].contiguous(), v[rows].contiguous()
    ranks = list(range(world))

    def run(on_step=None):
        return ring_attention(q_l, k_l, v_l, scale=scale, kv_segments=segments, ring_ranks=ranks, pattern=pattern,
                              on_step=on_step)

    seconds = slowest(median_seconds(run, device, args.warmup, args.iters), device)
    steps: list[RingStep] = []
    out, _ = run(steps.append)
    sent = torch.tensor([sum(s.bytes_sent for s in steps)], dtype=torch.float64, device=device)
    dist.all_reduce(sent)
    # Spot check against plain float32 attention of a few rows over all their visible keys.
    err = 0.0
    for i in torch.linspace(0, len(rows) - 1, CHECK_ROWS).long().tolist():
        pos = int(rows[i])
        ref, _ = attention_plain(q[pos : pos + 1], k[: pos + 1], v[: pos + 1], scale, q_start=pos, pattern=pattern)
        err = max(err, (out[i] - ref[0]).abs().max().item())
    return seconds, out, err, int(sent.item())


def time_sdpa(tokens: int, shape: Shape, scale: float, args, device) -> tuple[float, str]:
    """Single-device causal SDPA over `tokens` (cuDNN backend on CUDA); called on rank 0 only."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    q = torch.randn(1, shape.heads, tokens, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    k = torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    v = torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    backends = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else None

    def attempt(k_, v_, gqa):
        with torch.nn.attention.sdpa_kernel(backends) if backends else contextlib.nullcontext():
            fn = lambda: F.scaled_dot_product_attention(q, k_, v_, is_causal=True, scale=scale, enable_gqa=gqa)  # noqa: E731
            return median_seconds(fn, device, args.warmup, args.iters, synced=False)

    try:
        return attempt(k, v, True), "gqa"
    except RuntimeError:  # some backends take only expanded K/V; same FLOPs
        group = shape.heads // shape.kv_heads
        return attempt(k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False), "expanded"


def time_peer(q, k, v, scale, shape: Shape, world: int, args, device, mesh):
    """PyTorch context parallel on the same shapes; returns (seconds, local out [T/N, H, d], kv mode)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_rotate_method(args.peer_rotate)
    group = shape.heads // shape.kv_heads
    for kv_mode in ("gqa", "expanded"):
        q_b = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, d]
        if kv_mode == "gqa":
            k_b, v_b = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (k, v))
        else:
            k_b, v_b = (x.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).contiguous() for x in (k, v))
        buffers = [q_b, k_b, v_b]
        try:
            with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(buffers)):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):

                    def run():
                        return F.scaled_dot_product_attention(
                            q_b, k_b, v_b, is_causal=True, scale=scale, enable_gqa=kv_mode == "gqa"
                        )

                    seconds = slowest(median_seconds(run, device, args.warmup, args.iters), device)
                    out = run()
            return seconds, out[0].transpose(0, 1), kv_mode
        except RuntimeError as exc:
            if kv_mode == "expanded":
                raise
            if dist.get_rank() == 0:
                print(f"peer: GQA refused ({str(exc).splitlines()[0][:120]}); retrying with expanded K/V")
    raise AssertionError("unreachable")


# ---- driver ----------------------------------------------------------------------------------


def bench_length(tokens: int, shape: Shape, world: int, args, device, mesh) -> dict:
    rank = dist.get_rank()
    scale = 1 / math.sqrt(shape.head_dim)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same tensors on every rank
    q = torch.randn(tokens, shape.heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    k = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    v = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    chunk = args.chunk_tokens or -(-tokens // (2 * world))
    flops_per_gpu = causal_flops(tokens, shape) / world
    row: dict = {"tokens": tokens, "gpus": world, "chunk_tokens": chunk, "flops_per_gpu": flops_per_gpu}

    ring_s, ring_out, err, ring_bytes = time_ring(q, k, v, scale, world, chunk, args, device, args.pattern)
    err_t = torch.tensor([err], device=device)
    dist.all_reduce(err_t, op=dist.ReduceOp.MAX)
    row.update(ring_s=ring_s, ring_tflops_per_gpu=flops_per_gpu / ring_s / 1e12, ring_max_abs_err=err_t.item(),
               ring_bytes_sent=ring_bytes)
    if args.pattern is not None:  # the same tensors through the full causal ring
        full_s, _, _, full_bytes = time_ring(q, k, v, scale, world, chunk, args, device)
        row.update(pattern=asdict(args.pattern), full_ring_s=full_s, full_ring_bytes_sent=full_bytes,
                   speedup_vs_full=full_s / ring_s, bytes_vs_full=ring_bytes / full_bytes if full_bytes else None)

    sdpa_tokens = max(SEQUENCE_ALIGN, round(tokens / math.sqrt(world) / SEQUENCE_ALIGN) * SEQUENCE_ALIGN)
    sdpa = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        sdpa_s, sdpa_kv = time_sdpa(sdpa_tokens, shape, scale, args, device)
        sdpa[0] = causal_flops(sdpa_tokens, shape) / sdpa_s / 1e12
        row["sdpa_kv"] = sdpa_kv
    dist.broadcast(sdpa, 0)
    row.update(sdpa_tokens=sdpa_tokens, sdpa_tflops=sdpa.item())
    row["ring_vs_sdpa_pct"] = 100 * row["ring_tflops_per_gpu"] / row["sdpa_tflops"]

    if mesh is not None:
        peer_s, peer_out, peer_kv = time_peer(q, k, v, scale, shape, world, args, device, mesh)
        row.update(peer_s=peer_s, peer_tflops_per_gpu=flops_per_gpu / peer_s / 1e12, peer_kv=peer_kv)
        row["speedup_vs_peer"] = peer_s / ring_s
        if chunk * 2 * world == tokens:  # the peer's head-tail layout is ours: same rows
            diff = torch.tensor([(ring_out - peer_out.float()).abs().max().item()], device=device)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            row["peer_vs_ours_max_abs_diff"] = diff.item()
    del q, k, v, ring_out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_scaling(tokens: int, shape: Shape, world: int, args, device) -> dict:
    """One fixed problem on 1 GPU (rank 0 alone) and on all N."""
    rank = dist.get_rank()
    scale = 1 / math.sqrt(shape.head_dim)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q = torch.randn(tokens, shape.heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    k = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    v = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    one = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        solo = lambda: ring_attention(q, k, v, scale=scale, kv_segments=[[(0, tokens)]], ring_ranks=[0],  # noqa: E731
                                      pattern=args.pattern)
        one[0] = median_seconds(solo, device, args.warmup, args.iters, synced=False)
    dist.broadcast(one, 0)
    chunk = args.chunk_tokens or -(-tokens // (2 * world))
    many, _, _, _ = time_ring(q, k, v, scale, world, chunk, args, device, args.pattern)
    flops = causal_flops(tokens, shape)
    return {
        "tokens": tokens, "gpus": world, "one_gpu_s": one.item(), "n_gpu_s": many,
        "one_gpu_tflops": flops / one.item() / 1e12, "n_gpu_tflops_per_gpu": flops / world / many / 1e12,
        "speedup": one.item() / many, "efficiency_pct": 100 * one.item() / many / world,
    }


def print_table(rows: list[dict], scaling: dict | None) -> None:
    head = f"{'tokens':>9} {'N':>2} {'ring ms':>10} {'TF/s/GPU':>9} {'SDPA TF/s':>9} {'vs SDPA':>8} {'peer ms':>10} {'peer TF/s':>9} {'speed-up':>8} {'max err':>8}"
    print(head)
    for r in rows:
        peer_ms = f"{r['peer_s'] * 1e3:10.1f}" if "peer_s" in r else f"{'-':>10}"
        peer_tf = f"{r['peer_tflops_per_gpu']:9.1f}" if "peer_s" in r else f"{'-':>9}"
        speedup = f"{r['speedup_vs_peer']:7.2f}x" if "peer_s" in r else f"{'-':>8}"
        print(
            f"{r['tokens']:>9} {r['gpus']:>2} {r['ring_s'] * 1e3:10.1f} {r['ring_tflops_per_gpu']:9.1f} "
            f"{r['sdpa_tflops']:9.1f} {r['ring_vs_sdpa_pct']:7.1f}% {peer_ms} {peer_tf} {speedup} {r['ring_max_abs_err']:8.1e}"
        )
        if "pattern" in r:
            bytes_vs = f"{100 * r['bytes_vs_full']:.1f}%" if r["bytes_vs_full"] is not None else "-"
            print(
                f"{'':>9} {r['pattern']}: {r['ring_s'] * 1e3:.1f} ms, {r['ring_bytes_sent'] / 2**20:.2f} MiB sent; "
                f"full ring {r['full_ring_s'] * 1e3:.1f} ms, {r['full_ring_bytes_sent'] / 2**20:.2f} MiB: "
                f"speed-up {r['speedup_vs_full']:.2f}x, {bytes_vs} of the bytes"
            )
    if scaling:
        s = scaling
        print(
            f"scaling {s['tokens']} tokens: 1 GPU {s['one_gpu_s'] * 1e3:.1f} ms ({s['one_gpu_tflops']:.1f} TF/s), "
            f"{s['gpus']} GPUs {s['n_gpu_s'] * 1e3:.1f} ms ({s['n_gpu_tflops_per_gpu']:.1f} TF/s/GPU): "
            f"speed-up {s['speedup']:.2f}x, efficiency {s['efficiency_pct']:.0f}%"
        )


def worker(rank: int, world: int, args, init_file: str | None) -> None:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # one core per rank: ranks share the machine's cores
    timeout = timedelta(seconds=DIST_TIMEOUT_S)
    if init_file is None:  # torchrun
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout, **kwargs)
    try:
        shape = TINY if args.tiny else FULL
        mesh = None
        if device.type == "cuda" and not args.no_peer:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cuda", (world,))
        rows = [bench_length(int(t), shape, world, args, device, mesh) for t in args.lengths.split(",")]
        scaling = None
        if args.scaling:
            scaling = bench_scaling(args.scaling_tokens, shape, world, args, device)
        if rank == 0:
            print_table(rows, scaling)
            result = {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "shape": shape.__dict__,
                "dtype": str(args.dtype),
                "warmup": args.warmup,
                "iters": args.iters,
                "peer_rotate": args.peer_rotate,
                "pattern": asdict(args.pattern) if args.pattern is not None else None,
                "lengths": rows,
                "scaling": scaling,
            }
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (smoke test)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--lengths", default=None, help=f"total tokens, comma-separated (default {DEFAULT_LENGTHS})")
    p.add_argument("--chunk-tokens", type=int, default=0, help="zigzag chunk size (0: T / 2N)")
    p.add_argument("--scaling", action="store_true", help="also time one fixed problem on 1 vs N GPUs")
    p.add_argument("--scaling-tokens", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-rotate", default="alltoall", choices=["alltoall", "allgather"])
    p.add_argument("--no-peer", action="store_true", help="skip PyTorch context parallel")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--window", type=int, default=None, help="sliding window W: run that pattern, compare with full")
    p.add_argument("--sinks", type=int, default=0, help="with --window: sink tokens S (hybrid)")
    p.add_argument("--stride", type=int, default=None, help="with --window: every K-th key too (strided)")
    args = p.parse_args(argv)
    if args.window is None and (args.sinks or args.stride):
        p.error("--sinks and --stride add keys to a window: give --window")
    args.pattern = KeyPattern(window=args.window, sinks=args.sinks, stride=args.stride) if args.window else None
    args.lengths = args.lengths or (TINY_LENGTHS if args.tiny else DEFAULT_LENGTHS)
    args.scaling_tokens = args.scaling_tokens or (TINY_SCALING_LENGTH if args.tiny else SCALING_LENGTH)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        if args.nproc == 1:  # in this process: no spawn
            worker(0, 1, args, init_file)
        else:
            mp.spawn(worker, args=(args.nproc, args, init_file), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
