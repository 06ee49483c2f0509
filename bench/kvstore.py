"""Benchmarks of the KV store: load/store throughput against redis-benchmark, and what
quantization costs on the demo model.

throughput: KVBlockStore.put_blocks / get_blocks of --blocks blocks (one layer each) of
    --tokens tokens x --kv-heads x --head-dim in bf16, per quant mode, against a private
    redis-server on a free port (or --redis-url). Throughput = value bytes moved / wall time,
    quantization, encoding, checksums and decoding included; the best of --repeat rounds. Then
    plain redis-py asyncio pipelines of the same values (the Python client's own ceiling), and
    redis-benchmark SET/GET with values of the same sizes and the same number of connections,
    on the same Redis (what a C client gets from that server).
quant: bytes/token of each mode, attention-output error and greedy-token agreement on the demo
    model's real activations, or a checkpoint's with --model (bench/quant_eval.py); the
    prompt is this file's source text.

    python bench/kvstore.py throughput
    python bench/kvstore.py quant
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.* and shared.*

from bench.quant_eval import evaluate_quantization  # noqa: E402
from shared.kv.keys import block_chain  # noqa: E402
from shared.kv.quant import QUANT_MODES, bytes_per_token  # noqa: E402
from shared.kv.store import KVBlockStore  # noqa: E402
from shared.settings import Settings  # noqa: E402

MODEL_ID = "bench"
GB = 1e9
REDIS_START_TIMEOUT_S = 10.0
# redis-benchmark requests per test: enough for a steady rate.
REDIS_BENCHMARK_REQUESTS = 1000
# Llama-3-8B's KV shape, for the bytes/token column of the quant table.
REFERENCE_KV_HEADS, REFERENCE_HEAD_DIM = 8, 128


# ---- throughput -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


async def _store_round(store: KVBlockStore, items, refs, quant: str) -> tuple[float, float, int]:
    """(store seconds, load seconds, value bytes) of one round; the store's hot cache is off."""
    started = time.perf_counter()
    written = await store.put_blocks(items, MODEL_ID, quant)
    stored_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = await store.get_blocks(MODEL_ID, refs, [0], quant, torch.bfloat16, "cpu")
    load_s = time.perf_counter() - started
    if len(loaded) != len(refs) or written == 0:
        raise RuntimeError(f"round trip lost blocks: {len(loaded)}/{len(refs)} loaded, {written} bytes written")
    return stored_s, load_s, written


async def _client_throughput(args, redis_url: str) -> list[dict]:
    settings = Settings(redis_url=redis_url, kv_block_tokens=args.tokens, kv_hot_cache_bytes=0,
                        kv_io_concurrency=args.concurrency)
    refs = block_chain(MODEL_ID, list(range(args.blocks * args.tokens)), args.tokens)
    g = torch.Generator().manual_seed(0)
    shape = (args.tokens, args.kv_heads, args.head_dim)
    items = [(0, ref, torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16())
             for ref in refs]
    rows = []
    for quant in args.modes:
        store = KVBlockStore(settings)
        rounds = [await _store_round(store, items, refs, quant) for _ in range(args.repeat)]
        await store.close()
        nbytes = rounds[0][2]
        rows.append({
            "quant": quant,
            "value_bytes": nbytes // len(refs),
            "store_gbps": nbytes / min(r[0] for r in rounds) / GB,
            "load_gbps": nbytes / min(r[1] for r in rounds) / GB,
        })
    return rows


async def _raw_redis_py(
    redis_url: str, value_bytes: int, count: int, concurrency: int, repeat: int
) -> dict[str, float]:
    """GB/s of plain redis-py asyncio pipelines SET/GET of the same values: the Python client's own ceiling."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    value = bytes(value_bytes)
    keys = [f"ringserve:bench:raw:{i}" for i in range(count)]
    shares = [keys[i::concurrency] for i in range(concurrency)]

    async def run(command: str, share: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        for key in share:
            pipe.set(key, value) if command == "set" else pipe.get(key)
        await pipe.execute()

    best = {}
    for command in ("set", "get"):
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            await asyncio.gather(*(run(command, share) for share in shares if share))
            seconds.append(time.perf_counter() - started)
        best[command] = value_bytes * count / min(seconds) / GB
    await client.delete(*keys)
    await client.aclose()
    return best


def _redis_benchmark(port: int, value_bytes: int, requests: int, clients: int) -> dict[str, float]:
    """GB/s of redis-benchmark SET and GET of values of `value_bytes`."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark not found (Debian: apt-get install redis-tools)")
    out = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-n", str(requests), "-c", str(clients),
         "-d", str(value_bytes), "--csv"],
        check=True, capture_output=True, text=True,
    ).stdout
    rps = {row[0]: float(row[1]) for row in csv.reader(io.StringIO(out)) if row and row[0] in ("SET", "GET")}
    return {test.lower(): rps[test] * value_bytes / GB for test in ("SET", "GET")}


def throughput(args) -> None:
    torch.set_num_threads(args.threads)
    proc = None
    redis_url = args.redis_url
    if redis_url is None:
        port = _free_port()
        proc = _start_redis(port)
        redis_url = f"redis://127.0.0.1:{port}/0"
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    try:
        rows = asyncio.run(_client_throughput(args, redis_url))
        for row in rows:
            size = row["value_bytes"]
            row.update({f"redis_{k}": v for k, v in _redis_benchmark(port, size, REDIS_BENCHMARK_REQUESTS,
                                                                     args.concurrency).items()})
            raw = asyncio.run(_raw_redis_py(redis_url, size, args.blocks, args.concurrency, args.repeat))
            row.update({f"raw_{k}": v for k, v in raw.items()})
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    print(f"{args.blocks} blocks of {args.tokens} tokens x {args.kv_heads} KV heads x {args.head_dim} dims (bf16), "
          f"{args.concurrency} connections, {args.threads} torch thread(s), best of {args.repeat}")
    print("| mode | value bytes / block | KVBlockStore store | KVBlockStore load | redis-py SET | redis-py GET "
          "| redis-benchmark SET | redis-benchmark GET |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['value_bytes']:,} | {r['store_gbps']:.2f} | {r['load_gbps']:.2f} "
              f"| {r['raw_set']:.2f} | {r['raw_get']:.2f} | {r['redis_set']:.2f} | {r['redis_get']:.2f} |")
    print("(GB/s of value bytes)")


# ---- quantization -----------------------------------------------------------------------------


def quant(args) -> None:
    from shared.model import ensure_demo_checkpoint, load_model, load_tokenizer

    torch.set_num_threads(1)  # many tiny ops: one thread is faster on a small box
    if args.model:
        path = Path(args.model)
    else:
        path = ensure_demo_checkpoint(Path(args.demo_dir or tempfile.mkdtemp(prefix="ringserve-demo-")))
    model, tokenizer = load_model(path), load_tokenizer(path)
    ids = tokenizer.encode(Path(__file__).read_text())
    ids = ids[: args.prompt_blocks * args.tokens + args.tail_tokens]
    reports = evaluate_quantization(model, ids, list(args.modes), args.tokens, args.group, args.new_tokens)
    cfg = model.config
    bf16 = bytes_per_token("none", torch.bfloat16, REFERENCE_KV_HEADS, REFERENCE_HEAD_DIM, args.group, args.tokens)
    print(f"{path.name}: {cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads x {cfg.head_dim} dims; "
          f"prompt {len(ids)} tokens ({args.prompt_blocks} stored blocks of {args.tokens}), group {args.group}, "
          f"{args.new_tokens} greedy tokens")
    print(f"| mode | bytes/token/layer, demo ({cfg.num_key_value_heads}x{cfg.head_dim}) "
          f"| bytes/token/layer, {REFERENCE_KV_HEADS}x{REFERENCE_HEAD_DIM} | vs bf16 "
          "| attention-output rel. error | greedy tokens equal |")
    print("|---|---|---|---|---|---|")
    for r in reports:
        ref = bytes_per_token(r.mode, torch.bfloat16, REFERENCE_KV_HEADS, REFERENCE_HEAD_DIM, args.group, args.tokens)
        print(f"| {r.mode} | {r.bytes_per_token:.1f} | {ref:.0f} | {ref / bf16:.3f} "
              f"| {100 * r.attention_rel_error:.3f}% | {r.greedy_tokens_equal}/{r.new_tokens} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="store/load GB/s vs redis-benchmark")
    t.add_argument("--blocks", type=int, default=64)
    t.add_argument("--tokens", type=int, default=256)
    t.add_argument("--kv-heads", type=int, default=REFERENCE_KV_HEADS)
    t.add_argument("--head-dim", type=int, default=REFERENCE_HEAD_DIM)
    t.add_argument("--concurrency", type=int, default=Settings().kv_io_concurrency)
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--modes", nargs="+", default=list(QUANT_MODES), choices=QUANT_MODES)
    t.add_argument("--threads", type=int, default=1, help="torch threads (quantization, copies)")
    t.add_argument("--redis-url", default=None, help="an existing Redis (default: a private redis-server)")
    t.set_defaults(run=throughput)
    q = sub.add_parser("quant", help="bytes/token, attention error and greedy agreement on the demo model")
    q.add_argument("--tokens", type=int, default=Settings().kv_block_tokens, help="block tokens")
    q.add_argument("--group", type=int, default=Settings().kv_group_size)
    q.add_argument("--prompt-blocks", type=int, default=4)
    q.add_argument("--tail-tokens", type=int, default=37)
    q.add_argument("--new-tokens", type=int, default=32)
    q.add_argument("--modes", nargs="+", default=list(QUANT_MODES), choices=QUANT_MODES)
    q.add_argument("--demo-dir", default=None, help="where the demo checkpoint is (or is written)")
    q.add_argument("--model", default=None, help="a Hugging Face checkpoint directory instead of the demo")
    q.set_defaults(run=quant)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
