"""Benchmark one decode step's attention over a KV cache sharded across N GPUs.

One query token, 32 query heads, 8 KV heads, head dim 128, bf16, over --context tokens
(default 1M) split evenly over the N ranks. Each rank computes its partial (out, lse) with
decode_partial; the partials are then fused two ways:
  * bus:        partial -> CPU -> msgpack FusionRequest (shared.codec) -> NATS request to the
                fusion service's FusionTable on rank 0 (merge_partials in member order) ->
                reply decoded -> back on the device. Needs nats-server (--nats-url).
  * collective: collective_merge: point-to-point exchange of partials among the ranks
                (NCCL / gloo) and merge_partials on each one.
Both are compared with the memory floor: the shard's KV bytes over this GPU's measured copy
bandwidth (bytes read + written per second by a device-to-device copy). Times are medians
of wall-clock time (device synchronised) of the slowest rank, ranks starting together.

    torchrun --nproc-per-node 2 bench/decode.py --out decode.json
    python bench/decode.py --nproc 2 ...                 # spawns its own processes
    python bench/decode.py --device cpu --tiny           # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.*

from shared.attention.decode import collective_merge, decode_partial  # noqa: E402
from shared.attention.local import attention_plain  # noqa: E402


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int


FULL = Shape(heads=32, kv_heads=8, head_dim=128)
TINY = Shape(heads=4, kv_heads=2, head_dim=16)
DEFAULT_CONTEXT = 1 << 20
TINY_CONTEXT = 4096
COPY_BYTES = 1 << 30  # buffer copied to measure bandwidth (several times the L2)
TINY_COPY_BYTES = 1 << 24
BUS_SUBJECT = "ringserve.bench.fusion"
DIST_TIMEOUT_S = 600


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, n_bytes: int, iters: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        device_sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        device_sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times)


def median_step_seconds(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of step() with ranks starting together; the slowest rank's."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        dist.barrier()
        device_sync(device)
        t0 = time.perf_counter()
        step()
        device_sync(device)
        times.append(time.perf_counter() - t0)
    return slowest(statistics.median(times), device)


def slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---- bus fusion ------------------------------------------------------------------------------


class BusMerger:
    """The fusion service's own merge bookkeeping (services/fusion/table.FusionTable) behind a
    NATS subscription on rank 0: the service's work per message, minus its process boundary."""

    def __init__(self, nc, timeout_s: float):
        from services.fusion.table import FusionTable

        self.nc = nc
        self.table = FusionTable(timeout_s)

    async def on_partials(self, msg) -> None:
        from shared import codec
        from shared.messages import FusionRequest

        for reply_to, reply in self.table.add(codec.decode(msg.data, FusionRequest), msg.reply):
            await self.nc.publish(reply_to, codec.encode(reply))


async def bus_fusion(partial, world: int, rank: int, device, args):
    """Time partial -> bus -> merged over NATS: (slowest median seconds, last merged), or why not."""
    error = ""
    try:
        import nats

        from shared import codec
        from shared.messages import FusionReply, FusionRequest, PartialItem

        async def quiet(exc: Exception) -> None:  # the failure is reported once, below
            pass

        nc = await nats.connect(
            args.nats_url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=1, error_cb=quiet
        )
    except Exception as exc:  # no nats-server, or nats-py / pydantic not installed here
        nc, error = None, f"{type(exc).__name__}: {exc}"
    reachable = torch.tensor([0 if error else 1], device=device)
    dist.all_reduce(reachable, op=dist.ReduceOp.MIN)  # all ranks use the bus, or none
    if not reachable.item():
        if nc is not None:
            await nc.close()
        return error or "another rank could not use the bus"
    # Rank 0 hosts the merger on a subject unique to this run.
    name = [f"{BUS_SUBJECT}.{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)
    subject = name[0]
    if rank == 0:
        merger = BusMerger(nc, args.bus_timeout_s)
        await nc.subscribe(subject, cb=merger.on_partials)
        await nc.flush()
    dist.barrier()

    async def step(i: int):
        out, lse = partial()
        item = PartialItem(request_id="bench", step=i, layer=0, member=rank, parts=world, out=out.cpu(), lse=lse.cpu())
        data = codec.encode(FusionRequest(worker_id=f"rank{rank}", items=[item]))
        msg = await nc.request(subject, data, timeout=args.bus_timeout_s)
        merged = codec.decode(msg.data, FusionReply).items[0]
        return merged.out.to(device), merged.lse.to(device)

    times = []
    merged = None
    for i in range(args.warmup + args.iters):
        dist.barrier()
        device_sync(device)
        t0 = time.perf_counter()
        merged = await step(i)
        device_sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dist.barrier()  # every member has its reply before the merger goes away
    await nc.drain()
    return slowest(statistics.median(times), device), merged


# ---- driver ----------------------------------------------------------------------------------


def run(rank: int, world: int, args, device) -> dict | None:
    shape = TINY if args.tiny else FULL
    context = args.context or (TINY_CONTEXT if args.tiny else DEFAULT_CONTEXT)
    scale = 1 / math.sqrt(shape.head_dim)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same tensors on every rank
    q = torch.randn(1, shape.heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    k = torch.randn(context, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    v = torch.randn(context, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=args.dtype)
    shard = torch.tensor_split(torch.arange(context, device=device), world)[rank]
    k_shard, v_shard = k[shard].contiguous(), v[shard].contiguous()
    ring = list(range(world))

    def partial():
        return decode_partial(q, k_shard, v_shard, scale)

    def collective():
        out, lse = partial()
        return collective_merge(out, lse, ring)

    kv_bytes = 2 * k_shard.numel() * k_shard.element_size()
    bandwidth = torch.tensor([copy_bandwidth(device, TINY_COPY_BYTES if args.tiny else COPY_BYTES, args.iters)], device=device)
    dist.all_reduce(bandwidth, op=dist.ReduceOp.MIN)  # the slowest GPU's
    result: dict = {
        "context": context, "gpus": world, "kv_bytes_per_gpu": kv_bytes,
        "copy_bandwidth_gbs": bandwidth.item() / 1e9, "floor_s": kv_bytes / bandwidth.item(),
    }
    result["partial_s"] = median_step_seconds(partial, device, args.warmup, args.iters)
    result["collective_s"] = median_step_seconds(collective, device, args.warmup, args.iters)
    coll_out, coll_lse = collective()

    # Correctness: the merged step equals attention over the whole cache.
    ref_out, ref_lse = attention_plain(q, k, v, scale)
    err = torch.tensor([(coll_out - ref_out).abs().max().item()], device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    result["collective_max_abs_err"] = err.item()

    if not args.no_bus:
        bus = asyncio.run(bus_fusion(partial, world, rank, device, args))
        if isinstance(bus, str):
            result["bus_skipped"] = bus
        else:
            result["bus_s"], (bus_out, _) = bus
            # Same partials, same order, same function: identical bits when the merger runs on
            # the same kind of device (CPU here); a GPU's exp rounds differently from a CPU's.
            result["bus_vs_collective_max_abs_diff"] = (bus_out - coll_out).abs().max().item()
    for key in ("partial_s", "collective_s", "bus_s"):
        if key in result:
            result[key.replace("_s", "_vs_floor")] = result[key] / result["floor_s"]
    return result


def print_result(r: dict) -> None:
    print(
        f"decode step over {r['context']} tokens on {r['gpus']} ranks "
        f"({r['kv_bytes_per_gpu'] / 2**20:.1f} MiB KV per GPU, copy bandwidth {r['copy_bandwidth_gbs']:.0f} GB/s)"
    )
    print(f"{'':>12} {'us':>10} {'x floor':>8}")
    print(f"{'floor':>12} {r['floor_s'] * 1e6:10.1f} {1.0:8.2f}")
    for name in ("partial", "collective", "bus"):
        if f"{name}_s" in r:
            print(f"{name:>12} {r[f'{name}_s'] * 1e6:10.1f} {r[f'{name}_vs_floor']:8.2f}")
    if "bus_skipped" in r:
        print(f"{'bus':>12} skipped: {r['bus_skipped']}")
    print(f"collective max abs error vs full attention: {r['collective_max_abs_err']:.2e}")
    if "bus_vs_collective_max_abs_diff" in r:
        print(f"bus vs collective max abs difference: {r['bus_vs_collective_max_abs_diff']:.2e}")


def worker(rank: int, world: int, args, init_file: str | None) -> None:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if args.device == "cuda" else torch.device("cpu")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # one core per rank: ranks share the machine's cores
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=DIST_TIMEOUT_S)
    if init_file is None:  # torchrun
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout, **kwargs)
    try:
        result = run(rank, world, args, device)
        if rank == 0:
            result.update(
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, shape=(TINY if args.tiny else FULL).__dict__, dtype=str(args.dtype),
            )
            print_result(result)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and context (smoke test)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--context", type=int, default=0, help=f"cached tokens (default {DEFAULT_CONTEXT})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--bus-timeout-s", type=float, default=10.0)
    p.add_argument("--no-bus", action="store_true", help="skip bus fusion (no nats-server)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
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
