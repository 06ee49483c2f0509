"""Time to first token with a long shared prefix: a miss (every position computed) against a hit
(the prefix's blocks loaded from the KV store, only the tail computed).

Runs the whole local stack (private nats-server and redis-server on free ports; kvstore, fusion,
scheduler and one worker, each a process) on a random Llama written here (bigger than the demo
model, so the prefill is real work on a CPU). For each prefix length and round: request A =
a fresh random prefix + suffix a (a miss; its worker stores the prefix's blocks after replying),
wait until the kvstore lists them, then request B = the same prefix + suffix b (a hit). TTFT is the
scheduler's own (arrival to first token, prefix lookup included), max_new_tokens 1; medians.
"suffix alone" is the TTFT of a fresh prompt of just the suffix's length: the floor a hit
approaches. The worker's in-process hot cache is off unless --hot-cache: a hit reads its blocks
from Redis, as it would on a worker other than the one that stored them. Decode shard copies are
off unless --shards: their background writes after one request would land in the next one's TTFT.

    python bench/prefix_cache.py --lengths 512,1024,2048 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.*

from services.cli.stack import LocalStack  # noqa: E402
from shared.bus import Bus  # noqa: E402
from shared.client import RingserveClient  # noqa: E402
from shared.kv.client import KVIndexClient  # noqa: E402
from shared.kv.keys import block_chain  # noqa: E402
from shared.model import LlamaModel, parse_model_config  # noqa: E402
from shared.settings import Settings  # noqa: E402

SUFFIX_TOKENS = 16
SEED = 1234
STORE_WAIT_S = 60.0
POLL_S = 0.05
READY_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_random_llama(directory: Path, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int,
                       max_positions: int) -> None:
    """A Llama checkpoint with random weights (no tokenizer: requests send input_ids)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5, "rope_theta": 500_000.0, "max_position_embeddings": max_positions,
        "tie_word_embeddings": False, "dtype": "float32",
    }
    torch.manual_seed(SEED)
    model = LlamaModel(parse_model_config(config))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


async def _wait_stored(index: KVIndexClient, model_id: str, ids: list[int], args) -> None:
    refs = block_chain(model_id, ids, args.block_tokens)
    deadline = time.monotonic() + STORE_WAIT_S
    while await index.lookup(model_id, refs, "none", args.layers) < len(refs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not store the {len(refs)} blocks of a prompt")
        await asyncio.sleep(POLL_S)


async def _run(args, model_dir: Path) -> dict[int, dict[str, list[float]]]:
    settings = Settings(nats_url=f"nats://127.0.0.1:{_free_port()}", redis_url=f"redis://127.0.0.1:{_free_port()}/0",
                        kv_block_tokens=args.block_tokens)
    os.environ["RINGSERVE_KV_BLOCK_TOKENS"] = str(args.block_tokens)
    if not args.hot_cache:
        os.environ["RINGSERVE_KV_HOT_CACHE_BYTES"] = "0"
    os.environ["RINGSERVE_KV_SHARD_PERSIST"] = "1" if args.shards else "0"
    stack = LocalStack(settings, workers=1, model=str(model_dir),
                       state_dir=Path(tempfile.mkdtemp(prefix="ringserve-bench-prefix-")))
    stack.start()
    rng = random.Random(SEED)
    results: dict[int, dict[str, list[float]]] = {
        n: {"miss": [], "hit": [], "cached": [], "floor": []} for n in args.lengths}
    try:
        await stack.wait_ready(timeout=READY_TIMEOUT_S)
        client = await RingserveClient.connect(settings)
        index = KVIndexClient(Bus(client.nc, "bench"), settings)
        model_id = model_dir.resolve().name
        try:
            await client.generate({"input_ids": [1] * 64, "max_new_tokens": 1})  # warm-up
            for _ in range(args.rounds):
                for length in args.lengths:
                    prefix = [rng.randrange(args.vocab) for _ in range(length)]
                    miss_ids = prefix + [rng.randrange(args.vocab) for _ in range(SUFFIX_TOKENS)]
                    hit_ids = prefix + [rng.randrange(args.vocab) for _ in range(SUFFIX_TOKENS)]
                    miss = await client.generate({"input_ids": miss_ids, "max_new_tokens": 1})
                    await _wait_stored(index, model_id, miss_ids, args)
                    hit = await client.generate({"input_ids": hit_ids, "max_new_tokens": 1})
                    if miss.usage.cached_tokens or not hit.usage.cached_tokens:
                        raise RuntimeError(f"expected a miss then a hit, got {miss.usage} and {hit.usage}")
                    alone = await client.generate({"input_ids": hit_ids[-SUFFIX_TOKENS:], "max_new_tokens": 1})
                    results[length]["floor"].append(alone.timings.ttft_ms)
                    results[length]["miss"].append(miss.timings.ttft_ms)
                    results[length]["hit"].append(hit.timings.ttft_ms)
                    results[length]["cached"].append(hit.usage.cached_tokens)
        finally:
            await client.close()
    finally:
        stack.stop()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048", help="shared prefix tokens, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hot-cache", action="store_true", help="keep the worker's in-process hot cache on")
    parser.add_argument("--shards", action="store_true", help="keep decode shard persistence on")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]

    with tempfile.TemporaryDirectory(prefix="ringserve-bench-model-") as tmp:
        model_dir = Path(tmp) / "bench-llama"
        write_random_llama(model_dir, args.hidden, args.layers, args.heads, args.kv_heads, args.vocab,
                           max_positions=max(args.lengths) + 2 * SUFFIX_TOKENS)
        results = await _run(args, model_dir)

    kv_bytes_per_token = args.layers * 2 * args.kv_heads * (args.hidden // args.heads) * 4  # float32 K and V
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {args.kv_heads} KV heads, "
          f"float32 ({kv_bytes_per_token} KV bytes/token); blocks of {args.block_tokens} tokens; "
          f"hot cache {'on' if args.hot_cache else 'off'}; shard copies {'on' if args.shards else 'off'}; "
          f"medians of {args.rounds} rounds")
    print(f"| prompt tokens | cached tokens | TTFT miss (ms) | TTFT hit (ms) | speedup | suffix alone, {SUFFIX_TOKENS} "
          "tokens (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for length, r in results.items():
        miss, hit, floor = (statistics.median(r[key]) for key in ("miss", "hit", "floor"))
        print(f"| {length + SUFFIX_TOKENS} | {int(statistics.median(r['cached']))} | {miss:.1f} | {hit:.1f} "
              f"| {miss / hit:.1f}x | {floor:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
