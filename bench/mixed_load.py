"""Tail latency under mixed load: one long prompt, and a steady stream of short requests.

At t = 0 a long prompt is sent; short requests arrive meanwhile at seeded Poisson times. With
chunked prefill (`RINGSERVE_PREFILL_STEP_TOKENS`) the worker runs the short requests' prefills
and decode steps between the long prompt's chunks; in one pass they wait for all of it. For each
configuration: p50/p95/p99 of the short requests' time to first token and of their
inter-token latencies (every gap between two streamed tokens), and the long prompt's TTFT, all
measured by the client from the stream's events. The whole stack runs as `ringserve up` runs it
(services/cli/stack.py), one worker, the KV store off (so only scheduling differs).

    python bench/mixed_load.py --device cpu --out mixed.json      # a tiny random Llama on the CPU
    python bench/mixed_load.py --device cuda --model DIR --long 131072 --step 8192 --rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.* and services.*

from bench.serve import ConfiguredStack, percentile, prompt_ids, refuse_foreign_scheduler, stream_one  # noqa: E402
from services.cli.stack import LocalStack, StackError  # noqa: E402
from shared.client import RingserveClient  # noqa: E402
from shared.model.loader import load_config  # noqa: E402
from shared.settings import Settings  # noqa: E402

DEFAULT_WORKDIR = ".ringserve/bench-mixed"
ONE_PASS_STEP_TOKENS = 1 << 30  # larger than any prompt: every prefill in one pass
READY_TIMEOUT_S = 900.0
TINY_MAX_POSITIONS = 16384
QUANTILES = (50, 95, 99)
MS_PER_S = 1000.0


def ensure_tiny_checkpoint(workdir: Path) -> Path:
    from transformers import LlamaConfig

    from tests.helpers.checkpoints import save_tiny_checkpoint, tiny_dims

    target = workdir / "tiny-llama"
    if not (target / "config.json").is_file():
        cfg = LlamaConfig(**tiny_dims(hidden_size=128, num_hidden_layers=3, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=384,
                                      max_position_embeddings=TINY_MAX_POSITIONS))
        save_tiny_checkpoint(cfg, target, seed=0)
    return target


def quantiles(values: list[float]) -> dict:
    return {f"p{q}": percentile(values, q) for q in QUANTILES} if values else {}


async def mixed_load(client: RingserveClient, args: argparse.Namespace, vocab: int) -> dict:
    await stream_one(client, prompt_ids(args.seed, "warmup", args.short, 0, vocab), 2)  # the worker warm
    arrivals, t, rng = [], 0.0, random.Random(args.seed)
    for _ in range(args.count):
        t += rng.expovariate(args.rate)
        arrivals.append(t)
    t0 = time.perf_counter()

    async def short(i: int, at: float) -> dict:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        return await stream_one(client, prompt_ids(args.seed, "short", args.short, i, vocab), args.short_new, t0)

    long_task = asyncio.create_task(stream_one(client, prompt_ids(args.seed, "long", args.long, 0, vocab), 2, t0))
    shorts = await asyncio.gather(*(short(i, at) for i, at in enumerate(arrivals)))
    long_record = await long_task
    gaps = [(b - a) * MS_PER_S for r in shorts for a, b in zip(r["token_times_s"], r["token_times_s"][1:])]
    return dict(short_ttft_ms=quantiles([r["ttft_ms"] for r in shorts]), short_itl_ms=quantiles(gaps),
                long_ttft_ms=long_record["ttft_ms"], wall_s=time.perf_counter() - t0, requests=shorts)


async def run_config(name: str, step: int, args: argparse.Namespace, settings: Settings, model: Path,
                     vocab: int) -> dict:
    env = {"RINGSERVE_PREFILL_STEP_TOKENS": str(step), "RINGSERVE_KV_STORE_ENABLED": "false"}
    stack = ConfiguredStack(settings, workers=1, model=str(model), device=args.device,
                            state_dir=Path(args.workdir) / "state" / name, extra_env=env)
    try:
        await refuse_foreign_scheduler(settings)
        stack.start_services()
        await stack.wait_ready(READY_TIMEOUT_S)
        async with await RingserveClient.connect(settings) as client:
            return dict(env=env, **await mixed_load(client, args, vocab))
    finally:
        stack.stop()


def table(results: dict) -> str:
    def ms(d: dict, q: str) -> str:
        return f"{d[q]:,.0f}" if q in d else "-"

    lines = ["| config | short TTFT p50 / p95 / p99 ms | short inter-token p50 / p95 / p99 ms | long TTFT ms |",
             "| --- | ---: | ---: | ---: |"]
    for name, r in results["configs"].items():
        t, i = r["short_ttft_ms"], r["short_itl_ms"]
        lines.append(f"| {name} | {ms(t, 'p50')} / {ms(t, 'p95')} / {ms(t, 'p99')} "
                     f"| {ms(i, 'p50')} / {ms(i, 'p95')} / {ms(i, 'p99')} | {r['long_ttft_ms']:,.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", help="a Hugging Face checkpoint (default: a tiny random Llama in --workdir)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--long", type=int, default=6000, help="tokens of the long prompt")
    parser.add_argument("--short", type=int, default=48, help="tokens of each short prompt")
    parser.add_argument("--short-new", type=int, default=16, help="new tokens of each short request")
    parser.add_argument("--rate", type=float, default=4.0, help="short requests per second (Poisson)")
    parser.add_argument("--count", type=int, default=24, help="short requests")
    parser.add_argument("--step", type=int, default=256, help="RINGSERVE_PREFILL_STEP_TOKENS of the chunked run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="every figure as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(device=args.device)
    model = Path(args.model) if args.model else ensure_tiny_checkpoint(Path(args.workdir))
    vocab = load_config(model).vocab_size
    results: dict = dict(command=shlex.join([sys.executable, *sys.argv]),
                         date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=args.device,
                         model=str(model), long=args.long, short=args.short, short_new=args.short_new,
                         rate=args.rate, count=args.count, step=args.step, seed=args.seed, configs={})
    servers = LocalStack(settings, state_dir=Path(args.workdir) / "state")
    try:
        servers.start_servers()
        for name, step in ((f"chunked ({args.step})", args.step), ("one pass", ONE_PASS_STEP_TOKENS)):
            results["configs"][name] = asyncio.run(run_config(name.split()[0], step, args, settings, model, vocab))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        servers.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{args.device}, {model.name}: a {args.long}-token prompt and {args.count} requests of {args.short} "
          f"tokens (+{args.short_new} new) at {args.rate}/s\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
