"""Paged decode attention on one GPU: the Triton kernel of shared/attention/paged.py checked
against its torch reference, and timed against SDPA over contiguous caches.

check: for a few shapes (GQA, MQA, a group of 7, pages of 16..256 rows, head dims 64..256) and
    lengths 0, 1, P, P+1 and longer, the kernel (default splits and splits=1) against
    paged_decode_attention_reference, bf16: relative error max|out - ref| / max|ref| and the
    largest lse difference. Then one call captured in a CUDA graph, the lengths and page
    lists changed in place, the graph replayed, and compared again. One case puts pages past
    2^31 elements into the pool (int64 offsets).
time: Llama-3-8B attention (32 heads, 8 KV heads, head dim 128, bf16, page 256) for B x L
    cases (--cases): the kernel, captured in a CUDA graph (as the engine runs it), against
    F.scaled_dot_product_attention(q[:, :, None], K, V, enable_gqa=True) on contiguous
    [B, KVH, L, d] caches holding the same rows (also graphed, when it captures). Medians of
    --reps CUDA-event timings after --warmup replays, the L2 flushed before each. GB/s counts
    the KV bytes read (2 * B * L * KVH * d * 2) and is set against the copy bandwidth of a
    1 GiB device-to-device copy (bytes read + written) measured here.

    python bench/paged_attention.py --out paged.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.*

from shared.attention.paged import (  # noqa: E402
    default_splits,
    kernel_supports,
    paged_decode_attention,
    paged_decode_attention_reference,
)

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 256  # Llama-3-8B attention, the engine's page
DEFAULT_CASES = "1x8192,1x32768,1x131072,32x8192,64x4096"
COPY_BYTES = 1 << 30
FLUSH_BYTES = 256 << 20  # written before each timed run: several times the 60 MB L2
INT32_ELEMENTS = 1 << 31
LARGE_POOL_SPARE_PAGES = 64  # pages past 2^31 elements: more than the large-pool case uses
# (batch lengths, heads, kv heads, head dim, page) of the correctness check
CHECKS = [
    ([0, 1, 256, 257, 5000, 70000], 32, 8, 128, 256),
    ([0, 1, 16, 17, 3001], 8, 2, 64, 16),
    ([1, 100, 1000, 33], 4, 1, 256, 32),
    ([0, 64, 65, 9000], 28, 4, 128, 64),  # a group of 7: padded to 16 query rows
    ([2000, 1], 32, 32, 128, 128),  # no GQA: a group of 1
    ([0, 300, 4097], 16, 2, 256, 256),  # sub-tiles of 64 rows
    ([5, 1000, 129], 8, 1, 64, 256),  # sub-tiles of 128 rows
]


def random_cache(lens, heads, kv_heads, dim, page, gen, pool_pages=None, dtype=torch.bfloat16):
    """q, pools with shuffled page ids, block_table, seq_lens on the GPU. pool_pages: a larger pool
    (left uninitialised except the pages in use), whose highest pages are the ones in use."""
    need = [-(-n // page) for n in lens]
    used = sum(need)
    total = max(pool_pages or 0, used + 1)
    ids = total - used + torch.randperm(used, generator=gen, device="cuda")  # the top `used` pages
    k_pool = torch.empty(total, kv_heads, page, dim, dtype=dtype, device="cuda")
    v_pool = torch.empty_like(k_pool)
    for pool in (k_pool, v_pool):
        pool[total - used - 1 :] = torch.randn(used + 1, kv_heads, page, dim, generator=gen, device="cuda", dtype=dtype)
    table = torch.full((len(lens), max(max(need), 1)), total - 1, dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[at : at + n]
        at += n
    q = torch.randn(len(lens), heads, dim, generator=gen, device="cuda", dtype=dtype)
    return q, k_pool, v_pool, table, torch.tensor(lens, dtype=torch.int32, device="cuda")


def compare(got, want) -> dict:
    (out, lse), (ref_out, ref_lse) = got, want
    finite = ~torch.isinf(ref_lse)
    return {
        "rel_err": ((out - ref_out).abs().max() / ref_out.abs().max().clamp(min=1e-30)).item(),
        "lse_err": (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0,
        "inf_match": bool(torch.equal(torch.isinf(lse), torch.isinf(ref_lse))),
        "nan": bool(out.isnan().any() or lse.isnan().any()),
    }


def check_case(lens, heads, kv_heads, dim, page, gen, splits, pool_pages=None) -> dict:
    q, k_pool, v_pool, table, seq_lens = random_cache(lens, heads, kv_heads, dim, page, gen, pool_pages)
    assert kernel_supports(q, k_pool, v_pool)
    scale = 1 / math.sqrt(dim)
    args = (q, k_pool, v_pool, table, seq_lens, scale)
    want = paged_decode_attention_reference(*args)
    row = {"lens": lens, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "page": page}
    row["pool_elements"] = k_pool.numel()
    row["default"] = compare(paged_decode_attention(*args, splits=splits), want)
    row["splits_1"] = compare(paged_decode_attention(*args, splits=1), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = paged_decode_attention(*args, splits=splits)
    # Other lengths within each row's pages (reversed order), and the rows' page lists rotated.
    seq_lens.copy_(torch.flip(seq_lens, (0,)).clamp(max=table.shape[1] * page) // 2 + 1)
    table.copy_(torch.roll(table, 1, dims=1))
    graph.replay()
    torch.cuda.synchronize()
    row["graph_replay"] = compare(got, paged_decode_attention_reference(*args))
    return row


def flush_l2(buf: torch.Tensor) -> None:
    buf.zero_()


def median_ms(fn, warmup: int, reps: int, flush: torch.Tensor, graphed: bool = True) -> tuple[float, bool]:
    """Median CUDA-event time of fn() (replayed from a CUDA graph when it captures) -> (ms, graphed)."""
    fn()  # compile / pick kernels outside the capture
    torch.cuda.synchronize()
    run = fn
    if graphed:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except RuntimeError:
            graphed = False
    for _ in range(warmup):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush_l2(flush)
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), graphed


def copy_bandwidth(reps: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), 3, reps, torch.empty(0, device="cuda"), graphed=False)
    return 2 * COPY_BYTES / (ms / 1e3)


def time_case(batch: int, length: int, gen, args, bandwidth: float) -> dict:
    """Kernel vs SDPA for `batch` sequences of `length` rows, the same rows in both layouts."""
    n_pages = -(-length // PAGE)
    k = torch.randn(batch, KV_HEADS, n_pages * PAGE, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ids = torch.randperm(batch * n_pages, generator=gen, device="cuda")
    table = ids.view(batch, n_pages).to(torch.int32)
    k_pool, v_pool = (torch.empty(batch * n_pages, KV_HEADS, PAGE, HEAD_DIM, dtype=k.dtype, device="cuda") for _ in "kv")
    # [B, KVH, pages * P, d] -> [B * pages, KVH, P, d], page j of sequence b at ids[b * pages + j]
    for pool, dense in ((k_pool, k), (v_pool, v)):
        pool[ids] = dense.view(batch, KV_HEADS, n_pages, PAGE, HEAD_DIM).transpose(1, 2).reshape(-1, *pool.shape[1:])
    k, v = k[:, :, :length].contiguous(), v[:, :, :length].contiguous()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(HEAD_DIM)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def paged():
        return paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale, splits=args.splits)

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True, scale=scale)

    kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * k.element_size()
    row = {"batch": batch, "length": length, "kv_bytes": kv_bytes, "splits": args.splits or default_splits(batch, KV_HEADS)}
    for name, fn in (("paged", paged), ("sdpa", sdpa)):
        ms, graphed = median_ms(fn, args.warmup, args.reps, flush)
        gbs = kv_bytes / (ms / 1e3) / 1e9
        row[name] = {"ms": ms, "gbs": gbs, "of_copy": gbs * 1e9 / bandwidth, "graphed": graphed}
    row["speedup"] = row["sdpa"]["ms"] / row["paged"]["ms"]
    want = sdpa()[:, :, 0].float()
    row["paged_vs_sdpa_rel_err"] = ((paged()[0] - want).abs().max() / want.abs().max()).item()
    return row


def print_checks(rows) -> None:
    print(f"{'lens':>34} {'H/KVH':>6} {'d':>4} {'P':>4} {'rel err':>9} {'splits=1':>9} {'replay':>9} {'lse err':>9}  ok")
    for r in rows:
        parts = (r["default"], r["splits_1"], r["graph_replay"])
        ok = all(p["inf_match"] and not p["nan"] for p in parts)
        lens = ",".join(map(str, r["lens"])) + (" (pool > 2^31)" if r["pool_elements"] >= INT32_ELEMENTS else "")
        print(
            f"{lens:>34} {r['heads']:>3}/{r['kv_heads']:<2} {r['head_dim']:>4} {r['page']:>4} "
            f"{parts[0]['rel_err']:9.1e} {parts[1]['rel_err']:9.1e} {parts[2]['rel_err']:9.1e} "
            f"{max(p['lse_err'] for p in parts):9.1e}  {'yes' if ok else 'NO'}"
        )


def print_timings(rows, bandwidth: float) -> None:
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    print(f"{'B x L':>10} {'splits':>6} {'paged ms':>9} {'GB/s':>6} {'of copy':>8} {'SDPA ms':>9} {'GB/s':>6} {'of copy':>8} {'speed-up':>8}")
    for r in rows:
        p, s = r["paged"], r["sdpa"]
        print(
            f"{r['batch']:>4}x{r['length']:<6} {r['splits']:>6} {p['ms']:9.4f} {p['gbs']:6.0f} {p['of_copy']:8.1%} "
            f"{s['ms']:9.4f} {s['gbs']:6.0f} {s['of_copy']:8.1%} {r['speedup']:7.2f}x"
        )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="BxL, comma-separated (batch x tokens per sequence)")
    p.add_argument("--splits", type=int, default=None, help="kernel programs per (sequence, KV head) (default: the kernel's choice)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--no-large-pool", action="store_true", help="skip the check with a pool past 2^31 elements")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "splits": args.splits}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        sys.exit("needs triton")
    if not args.no_check:
        checks = [check_case(*c, gen, args.splits) for c in CHECKS]
        if not args.no_large_pool:  # pages past 2^31 elements of the pool: int64 offsets
            pages = INT32_ELEMENTS // (KV_HEADS * PAGE * HEAD_DIM) + LARGE_POOL_SPARE_PAGES
            checks.append(check_case([3000, 700], HEADS, KV_HEADS, HEAD_DIM, PAGE, gen, args.splits, pages))
        result["checks"] = checks
        print_checks(checks)
        torch.cuda.empty_cache()
    bandwidth = copy_bandwidth(args.reps)
    result["copy_bandwidth_gbs"] = bandwidth / 1e9
    result["timings"] = []
    for case in args.cases.split(","):
        batch, length = (int(x) for x in case.lower().split("x"))
        result["timings"].append(time_case(batch, length, gen, args, bandwidth))
        torch.cuda.empty_cache()
    print_timings(result["timings"], bandwidth)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
