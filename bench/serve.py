"""The whole stack, measured as a user meets it: time to first token and decode speed through the
public NATS API, one request at a time and many at once, in several service configurations.

Starts nats-server and redis-server where none answers at RINGSERVE_NATS_URL / RINGSERVE_REDIS_URL,
then, per configuration, kvstore, fusion, scheduler and N workers as child processes (the
`LocalStack` of `ringserve up`), and streams requests with `RingserveClient`. Prompts are random
token ids (a fresh prompt per request, so the prefix cache never hits); decoding is greedy.
The same prompts then go through transformers' `generate` in this process (the peer).

    python bench/serve.py --device cuda --out serve.json       # random Llama-3-8B shape, bf16
    python bench/serve.py --device cpu --tiny --out tiny.json  # smoke mode, well under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.* and services.*

from services.cli.stack import LocalStack, StackError, log_tail  # noqa: E402
from shared.client import RingserveClient, RingserveError  # noqa: E402
from shared.messages import DoneEvent, TokenEvent  # noqa: E402
from shared.model.loader import load_config  # noqa: E402
from shared.settings import Settings  # noqa: E402

DEFAULT_WORKDIR = ".ringserve/bench-serve"
# What each mode measures unless a flag says otherwise.
# Concurrent requests get more new tokens: their prefills run one after another first, and the
# decode of the whole batch (what --concurrent measures) only starts once the last one is done.
FULL_DEFAULTS = dict(lengths="8192,32768,131072", new_tokens=64, reps=3, concurrent=32, concurrent_prompt=8192,
                     concurrent_new_tokens=256)
TINY_DEFAULTS = dict(lengths="64,256", new_tokens=16, reps=1, concurrent=8, concurrent_prompt=64,
                     concurrent_new_tokens=32)
WARMUP_REQUESTS = 1  # per prompt length, before the timed ones
# Service environment of each configuration; the services restart between configurations.
CONFIGS: dict[str, dict[str, str]] = {
    "defaults": {},
    "noshards": {"RINGSERVE_KV_SHARD_PERSIST": "false"},  # prefix blocks stored, no decode shard copies
    "nostore": {"RINGSERVE_KV_STORE_ENABLED": "false"},
}
READY_TIMEOUT_S = 900.0  # workers load the checkpoint first: 16 GB for the 8B shape
WORKER_LOG_TAIL_LINES = 40
P50, P99 = 50, 99
MS_PER_S = 1000.0
EXIT_FAILED, EXIT_NO_SERVERS = 1, 2  # a configuration failed; a server is missing or did not start

# The random checkpoint: Llama-3-8B's shape, llama3 rope, no eos (every request runs to its length).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MAX_POSITIONS = 1_048_576
INIT_STD = 0.02  # transformers' own initializer range: small weights, sane activations
LLAMA3_8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5)
FULL_DTYPE = torch.bfloat16
# The tiny model of tests/helpers/checkpoints.py, a little larger.
TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=4096)
CHECKPOINT_SEED = 0
SEED_BITS = 63  # torch generators take 64-bit seeds


# ---- the checkpoint ----------------------------------------------------------------------------


def write_llama3_8b_shape(directory: Path, device: str) -> None:
    """Random bf16 weights of the Llama-3-8B shape, initialised on `device` by transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA3_8B_SHAPE, rope_parameters=dict(LLAMA3_ROPE), max_position_embeddings=MAX_POSITIONS,
                         initializer_range=INIT_STD, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(CHECKPOINT_SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=FULL_DTYPE)  # a LlamaForCausalLM
    model.save_pretrained(directory, safe_serialization=True)


def write_tiny(directory: Path) -> None:
    from transformers import LlamaConfig

    from tests.helpers.checkpoints import save_tiny_checkpoint, tiny_dims

    save_tiny_checkpoint(LlamaConfig(**tiny_dims(**TINY_SHAPE)), directory, seed=CHECKPOINT_SEED)


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    """--model, else the random checkpoint in --workdir (written once, aside, then renamed)."""
    if args.model:
        return Path(args.model).expanduser()
    target = Path(args.workdir) / ("tiny-llama" if args.tiny else "random-llama3-8b-shape")
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"writing the random checkpoint to {target}", file=sys.stderr, flush=True)
    if args.tiny:
        write_tiny(staging)
    else:
        write_llama3_8b_shape(staging, args.device)
        torch.cuda.empty_cache()  # the model is gone: its GPU memory goes back to the workers (no-op without CUDA)
    staging.rename(target)
    return target


def model_shape(path: Path) -> dict:
    config = load_config(path)
    return dict(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                kv_heads=config.num_key_value_heads, head_dim=config.head_dim, ffn=config.intermediate_size,
                vocab=config.vocab_size, max_positions=config.max_position_embeddings,
                rope=config.rope.rope_type)


def prompt_ids(seed: int, case: str, length: int, index: int, vocab: int) -> list[int]:
    """A random prompt, the same for the stack and the peer; every (case, length, index) differs."""
    generator = torch.Generator().manual_seed(random.Random(f"{seed}:{case}:{length}:{index}").getrandbits(SEED_BITS))
    return torch.randint(vocab, (length,), generator=generator).tolist()


# ---- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks."""
    ordered, rank = sorted(values), (len(values) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(values) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def timing_record(t0: float, sent: float, token_times: list[float], done: float, completion: int) -> dict:
    """Client-side timings, seconds relative to t0; decode tok/s between the first and last token."""
    first, last = token_times[0], token_times[-1]
    return dict(sent_s=sent - t0, first_token_s=first - t0, end_s=done - t0, ttft_ms=(first - sent) * MS_PER_S,
                decode_tok_s=(completion - 1) / (last - first) if completion > 1 and last > first else None,
                token_times_s=[t - t0 for t in token_times])


async def stream_one(client: RingserveClient, ids: list[int], new_tokens: int, t0: float | None = None) -> dict:
    """One streamed greedy request: its timings (client and server) and how it finished."""
    request = {"input_ids": ids, "max_new_tokens": new_tokens, "temperature": 0.0}
    sent = time.perf_counter()
    token_times: list[float] = []
    reply = None
    async for event in client.stream(request):
        if isinstance(event, TokenEvent):
            token_times.append(time.perf_counter())
        elif isinstance(event, DoneEvent):
            reply = event
    done = time.perf_counter()
    if reply is None or not token_times:
        raise RingserveError("internal", f"the stream ended without tokens (reply {reply})")
    return dict(request_id=reply.request_id, prompt_tokens=reply.usage.prompt_tokens, max_new_tokens=new_tokens,
                completion_tokens=reply.usage.completion_tokens, finish_reason=reply.finish_reason,
                cached_tokens=reply.usage.cached_tokens, server_ttft_ms=reply.timings.ttft_ms,
                **timing_record(sent if t0 is None else t0, sent, token_times, done, reply.usage.completion_tokens))


def single_summary(length: int, records: list[dict]) -> dict:
    return dict(prompt_tokens=length, ttft_ms=median_of(records, "ttft_ms"),
                server_ttft_ms=median_of(records, "server_ttft_ms"), decode_tok_s=median_of(records, "decode_tok_s"),
                cached_tokens=max((r.get("cached_tokens", 0) for r in records), default=0), requests=records)


def concurrent_summary(prompt: int, records: list[dict]) -> dict:
    """Aggregate tok/s: all completion tokens over the time from the first token of any to the end.
    Batch decode tok/s: the tokens that came after every request had its first one (all were
    decoding together), over that phase's length: the decode throughput of the whole batch."""
    span = max(r["end_s"] for r in records) - min(r["first_token_s"] for r in records)
    ttfts = [r["ttft_ms"] for r in records]
    together = max(r["first_token_s"] for r in records)
    batch_phase = max(r["end_s"] for r in records) - together
    batch_tokens = sum(1 for r in records for t in r["token_times_s"] if t > together)
    for r in records:
        del r["token_times_s"]
    return dict(requests_at_once=len(records), prompt_tokens=prompt,
                batch_decode_tok_s=batch_tokens / batch_phase if batch_phase > 0 and batch_tokens else None,
                aggregate_tok_s=sum(r["completion_tokens"] for r in records) / span if span > 0 else None,
                wall_s=max(r["end_s"] for r in records), ttft_p50_ms=percentile(ttfts, P50),
                ttft_p99_ms=percentile(ttfts, P99), decode_tok_s_median=median_of(records, "decode_tok_s"),
                requests=records)


# ---- the stack ---------------------------------------------------------------------------------


class ConfiguredStack(LocalStack):
    """`ringserve up`'s services with the extra environment of one configuration."""

    def __init__(self, *args, extra_env: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_env = extra_env

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), **self.extra_env}


async def refuse_foreign_scheduler(settings: Settings) -> None:
    """Another stack on the same NATS would share our requests: stop rather than measure it."""
    async with await RingserveClient.connect(settings) as client:
        try:
            await client.status()
        except RingserveError:
            return
    raise StackError(f"a scheduler already answers on {settings.nats_url}: stop it, or set RINGSERVE_NATS_URL")


async def measure_stack(client: RingserveClient, args: argparse.Namespace, vocab: int) -> dict:
    single = []
    for length in args.lengths:
        records = [await stream_one(client, prompt_ids(args.seed, "single", length, index, vocab), args.new_tokens)
                   for index in range(WARMUP_REQUESTS + args.reps)][WARMUP_REQUESTS:]
        for r in records:
            del r["token_times_s"]
        single.append(single_summary(length, records))
        print(f"  {length} tokens: ttft {single[-1]['ttft_ms']:.1f} ms, "
              f"decode {single[-1]['decode_tok_s'] or 0:.1f} tok/s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    records = await asyncio.gather(*(
        stream_one(client, prompt_ids(args.seed, "concurrent", args.concurrent_prompt, i, vocab),
                   args.concurrent_new_tokens, t0)
        for i in range(args.concurrent)))
    concurrent = concurrent_summary(args.concurrent_prompt, list(records))
    print(f"  {args.concurrent} x {args.concurrent_prompt}: batch decode {concurrent['batch_decode_tok_s'] or 0:.1f} "
          f"tok/s, aggregate {concurrent['aggregate_tok_s'] or 0:.1f} tok/s", file=sys.stderr, flush=True)
    return dict(single=single, concurrent=concurrent)


async def bench_config(name: str, args: argparse.Namespace, settings: Settings, model_dir: Path, vocab: int) -> dict:
    env = CONFIGS[name]
    stack = ConfiguredStack(settings, workers=args.workers, model=str(model_dir), device=args.device,
                            state_dir=Path(args.workdir) / "state" / name, extra_env=env)
    print(f"config {name}: starting {args.workers} worker(s); logs in {stack.log_dir}", file=sys.stderr, flush=True)
    try:
        await refuse_foreign_scheduler(settings)
        stack.start_services()
        status = await stack.wait_ready(READY_TIMEOUT_S)
        async with await RingserveClient.connect(settings) as client:
            result = await measure_stack(client, args, vocab)
        return dict(env=env, log_dir=str(stack.log_dir), workers=[w.model_dump() for w in status.workers], **result)
    except Exception as exc:
        print(f"config {name} failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        for path in [c.log_path for c in stack.services if c.name.startswith("worker-")]:
            print(f"--- last lines of {path} ---\n{log_tail(path, WORKER_LOG_TAIL_LINES)}", file=sys.stderr)
        return dict(env=env, log_dir=str(stack.log_dir), error=f"{type(exc).__name__}: {exc}")
    finally:
        stack.stop()


# ---- in process: the worker's engine alone, and transformers ----------------------------------


def run_engine(args: argparse.Namespace, model_dir: Path, vocab: int) -> dict:
    """The worker's own engine (same settings, KV pool and CUDA graphs as a worker) driven in this
    process: prefill, then one decode step after another. The stack's figures minus these are
    what the services add (bus, event loops, scheduler, streaming)."""
    from services.worker.loading import load_engine
    from shared.messages import DecodeStep, PrefillCommand, RingPlan, SamplingParams, Segment

    engine, _, _ = load_engine(Settings(model=str(model_dir), device=args.device))
    greedy = SamplingParams()

    def prefill(rid: str, ids: list[int]) -> tuple[int, float]:
        n = len(ids)
        plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=n,
                        segments=[[Segment(start=0, end=n)]], prompt_tokens=n, fusion_partition="-")
        started = time.perf_counter()
        token = engine.prefill(PrefillCommand(plan=plan, member=0, input_ids=ids, sampling=greedy)).token_id
        return token, time.perf_counter() - started

    def decode(last: dict[str, int], prompt: dict[str, int], steps: int) -> float:
        """Median seconds per step of the batch `last` (each step ends with its host sync)."""
        times = []
        for step in range(steps):
            batch = [DecodeStep(request_id=rid, step=step, token_id=token, position=prompt[rid] + step,
                                append_member=0, sampling=greedy) for rid, token in last.items()]
            started = time.perf_counter()
            for s, result in zip(batch, engine.decode(batch, fuse=None)):
                last[s.request_id] = result.token_id
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    single = []
    for length in args.lengths:
        records = []
        for index in range(WARMUP_REQUESTS + args.reps):
            rid = f"engine-{length}-{index}"
            token, seconds = prefill(rid, prompt_ids(args.seed, "single", length, index, vocab))
            step_s = decode({rid: token}, {rid: length}, args.new_tokens - 1)
            engine.release(rid)
            records.append(dict(ttft_ms=seconds * MS_PER_S, server_ttft_ms=None, step_ms=step_s * MS_PER_S,
                                decode_tok_s=1 / step_s))
        single.append(single_summary(length, records[WARMUP_REQUESTS:]))
        print(f"  engine {length} tokens: prefill {single[-1]['ttft_ms']:.1f} ms, "
              f"decode {single[-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    rids = [f"engine-batch-{i}" for i in range(args.concurrent)]
    last = {rid: prefill(rid, prompt_ids(args.seed, "concurrent", args.concurrent_prompt, i, vocab))[0]
            for i, rid in enumerate(rids)}
    step_s = decode(last, {rid: args.concurrent_prompt for rid in rids}, args.concurrent_new_tokens - 1)
    concurrent = dict(requests_at_once=args.concurrent, prompt_tokens=args.concurrent_prompt,
                      batch_decode_tok_s=args.concurrent / step_s, step_ms=step_s * MS_PER_S)
    print(f"  engine {args.concurrent} x {args.concurrent_prompt}: {concurrent['batch_decode_tok_s']:.1f} tok/s",
          file=sys.stderr, flush=True)
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return dict(name="services.worker.engine in-process", single=single, concurrent=concurrent)



def run_peer(args: argparse.Namespace, model_dir: Path, vocab: int, dtype: str) -> dict:
    """transformers' `generate`: greedy, eager PyTorch (no compile), SDPA attention, batch 1."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        print("transformers is not installed: no peer", file=sys.stderr)
        return dict(skipped="transformers is not installed")

    class TokenClock(BaseStreamer):
        """The time of every `put`: the prompt's, then each generated token's."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model = model.to(args.device).eval()

    def one(ids: torch.Tensor) -> dict:
        clock = TokenClock()
        sent = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, streamer=clock)
        completion = out.shape[1] - ids.shape[1]
        return dict(prompt_tokens=ids.shape[1], max_new_tokens=args.new_tokens, completion_tokens=completion,
                    **timing_record(sent, sent, clock.times[1:], clock.times[-1], completion))

    single = []
    for length in args.lengths:
        try:
            records = [one(torch.tensor([prompt_ids(args.seed, "single", length, index, vocab)], device=args.device))
                       for index in range(WARMUP_REQUESTS + args.reps)][WARMUP_REQUESTS:]
        except torch.OutOfMemoryError as exc:  # the peer keeps every activation of a long prefill
            single.append(dict(prompt_tokens=length, error=f"OutOfMemoryError: {str(exc).splitlines()[0]}"))
            torch.cuda.empty_cache()
            continue
        single.append(single_summary(length, records))
        print(f"  transformers {length} tokens: ttft {single[-1]['ttft_ms']:.1f} ms", file=sys.stderr, flush=True)
    return dict(name="transformers.generate", version=transformers.__version__, attn_implementation="sdpa",
                compiled=False, dtype=dtype, single=single)


# ---- output ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(results: dict) -> str:
    lines = ["| config | prompt tokens | TTFT ms (client) | TTFT ms (server) | decode tok/s | cached tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = list(results["configs"].items())
    if "single" in results["engine"]:
        rows.append(("engine in-process", results["engine"]))
    if "single" in results["peer"]:
        rows.append(("transformers", results["peer"]))
    for name, r in rows:
        for s in r.get("single") or [dict(prompt_tokens="-", error=r.get("error", "no result"))]:
            if "error" in s:
                lines.append(f"| {name} | {s['prompt_tokens']} | failed: {s['error'][:80]} | | | |")
                continue
            lines.append(f"| {name} | {s['prompt_tokens']} | {fmt(s['ttft_ms'])} | {fmt(s['server_ttft_ms'])} "
                         f"| {fmt(s['decode_tok_s'])} | {s['cached_tokens']} |")
    lines += ["", "| config | requests x prompt | batch decode tok/s | aggregate tok/s | TTFT p50 ms | TTFT p99 ms "
              "| median decode tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in [*results["configs"].items(), *(("engine", results["engine"]),) * ("concurrent" in results["engine"])]:
        if "concurrent" in r:
            c = r["concurrent"]
            lines.append(f"| {name} | {c['requests_at_once']} x {c['prompt_tokens']} | {fmt(c['batch_decode_tok_s'])} "
                         f"| {fmt(c.get('aggregate_tok_s'))} | {fmt(c.get('ttft_p50_ms'))} | {fmt(c.get('ttft_p99_ms'))} "
                         f"| {fmt(c.get('decode_tok_s_median'))} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face checkpoint directory (default: a random one in --workdir)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="the random checkpoint and the stack's logs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny float32 model, short prompts")
    for key, default in FULL_DEFAULTS.items():  # --lengths (comma-separated), --new-tokens, --reps, ...
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(default),
                            help=f"default {default}; with --tiny {TINY_DEFAULTS[key]}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--no-peers", action="store_true", help="skip transformers' generate")
    parser.add_argument("--no-engine", action="store_true", help="skip the worker's engine run in-process")
    parser.add_argument("--seed", type=int, default=time.time_ns() % 2**SEED_BITS,
                        help="prompt seed (default: the clock, so no run hits an earlier run's prefix cache)")
    parser.add_argument("--out", help="write every figure as JSON here")
    args = parser.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    settings = Settings(device=args.device)
    model_dir = ensure_checkpoint(args)
    shape = model_shape(model_dir)
    longest = max(args.lengths + [args.concurrent_prompt]) + max(args.new_tokens, args.concurrent_new_tokens)
    if longest > shape["max_positions"]:
        print(f"error: {longest} positions, but the model takes {shape['max_positions']}", file=sys.stderr)
        return EXIT_FAILED
    results: dict = dict(
        command=shlex.join([sys.executable, *sys.argv]), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu"),
        torch=torch.__version__, model=str(model_dir), shape=shape, dtype=settings.torch_dtype_name,
        workers=args.workers, seed=args.seed, lengths=args.lengths, new_tokens=args.new_tokens, reps=args.reps,
        warmup=WARMUP_REQUESTS, concurrent=args.concurrent, concurrent_prompt=args.concurrent_prompt, configs={})
    servers = LocalStack(settings, state_dir=Path(args.workdir) / "state")  # launches only missing servers
    try:
        servers.start_servers()
        for name in args.configs:
            results["configs"][name] = asyncio.run(bench_config(name, args, settings, model_dir, shape["vocab"]))
    except StackError as exc:  # a server is missing or did not start
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SERVERS
    finally:
        servers.stop()
    results["engine"] = dict(skipped="--no-engine") if args.no_engine else run_engine(args, model_dir, shape["vocab"])
    results["peer"] = (dict(skipped="--no-peers") if args.no_peers
                       else run_peer(args, model_dir, shape["vocab"], settings.torch_dtype_name))
    results["elapsed_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{results['device']}, torch {results['torch']}, model {model_dir.name} ({shape['layers']} layers, "
          f"hidden {shape['hidden']}, {results['dtype']}), {args.workers} worker(s), {args.new_tokens} new tokens, "
          f"medians of {args.reps} after {WARMUP_REQUESTS} warm-up\n")
    print(tables(results))
    return EXIT_FAILED if any("error" in r for r in results["configs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
