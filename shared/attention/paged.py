"""Decode attention over a paged KV cache: one call per layer for a whole batch (PagedAttention-style).

Shapes:
  q:             [B, H, d]              one decode query per sequence, model dtype
  k_pool/v_pool: [pages, KVH, P, d]     one layer's pool; page p, KV head h, slot s (P = page tokens)
  block_table:   [B, max_pages] int32   page ids of each sequence in row order: row r of
                                        sequence b is page block_table[b, r // P], slot r % P
  seq_lens:      [B] int32              rows valid per sequence (0: out 0, lse -inf)
  seq_starts:    [B] int32 or None      rows before this are not attended (a sliding window:
                                        rows ascend in position, so the window is a suffix)
  -> out [B, H, d] float32, lse [B, H] float32 (natural log), a partial for merge_partials.
Query head h reads KV head h // (H // KVH).

Two paths:
  * reference (CPU, float32/float64, anything the kernel refuses): per sequence, gather its rows
    contiguously and call attention_with_lse, so the numerics are those of the non-paged path.
  * CUDA bf16/fp16 with Triton: flash-decoding with split-K. Grid (B, KVH, SPLITS); program
    (b, h, s) reads seq_lens[b] from device memory, takes its share of the sequence's pages,
    runs an online softmax for the GQA group of kv head h and writes a partial; a second kernel
    merges the SPLITS partials as merge_partials does. No host sync and no shape depends on
    seq_lens, so one launch serves any lengths and is CUDA-graph capturable.
"""

from __future__ import annotations

import math

import torch

from shared.attention.local import attention_with_lse

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds may lack triton: the reference path serves
    triton = None

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# Default split count: enough programs (B * KVH * splits) to keep HBM busy, about 2 per SM of
# an H200 (132 SMs), but never below MIN_SPLITS, so that one long sequence in a batch of short
# ones still gets that many programs per KV head. Shapes only, so graph-safe. Tuned on an H200
# (bench/paged_attention.py): 32 for one sequence (B * KVH = 8), 16 for batches.
TARGET_PROGRAMS = 256
MIN_SPLITS, MAX_SPLITS = 16, 32
DOT_MIN = 16  # smallest tl.dot side: the GQA group is padded up to this many query rows
MAX_BLOCK_N = 128  # rows of K/V per inner step (a page of more rows is walked in sub-tiles)
TILE_ELEMENTS = 128 * 128  # at most BLOCK_N * d elements per K (or V) tile: bounds shared memory
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
NUM_WARPS = 4
NUM_STAGES = 3
LOG2E = 1 / math.log(2)


def gather_rows(pool: torch.Tensor, pages: list[int] | torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of one sequence whose page ids are `pages`, from pool [pages, KVH, P, d] -> [hi-lo, KVH, d]."""
    _, kv_heads, page, dim = pool.shape
    if hi <= lo:
        return pool.new_empty(0, kv_heads, dim)
    first, last = lo // page, -(-hi // page)
    ids = torch.as_tensor(pages[first:last], dtype=torch.long, device=pool.device)
    rows = pool[ids].transpose(1, 2).reshape(-1, kv_heads, dim)  # [(last-first)*P, KVH, d]
    return rows[lo - first * page : hi - first * page]


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    seq_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: gather its rows and call attention_with_lse (the non-paged path's numerics)."""
    batch, heads, dim = q.shape
    out = torch.zeros(batch, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads), float("-inf"), dtype=torch.float32, device=q.device)
    starts = [0] * batch if seq_starts is None else seq_starts.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        if n <= starts[b]:
            continue
        k = gather_rows(k_pool, block_table[b], starts[b], n)
        v = gather_rows(v_pool, block_table[b], starts[b], n)
        o, l = attention_with_lse(q[b : b + 1], k, v, scale)
        out[b], lse[b] = o[0], l[0]
    return out, lse


def paged_rows_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    row_valid: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's query over a few chosen rows of its cache (the sink and
    strided keys of a hybrid or strided pattern, outside its window), exact in float32.

    rows [B, E] int64: row indices into each sequence (its block table's order), padded;
    row_valid [B, E] bool: which of them count (a sequence with none gives out 0, lse -inf).
    -> (out [B, H, d], lse [B, H]), a partial to merge with the window's (merge_partials)."""
    batch, heads, dim = q.shape
    kv_heads, page = k_pool.shape[1], k_pool.shape[2]
    group = heads // kv_heads
    pages = torch.gather(block_table.long(), 1, rows // page)  # [B, E]
    slots = rows % page
    k = k_pool[pages, :, slots].float()  # [B, E, KVH, d]
    v = v_pool[pages, :, slots].float()
    qg = q.float().reshape(batch, kv_heads, group, dim)
    scores = torch.einsum("bhgd,behd->bhge", qg, k) * scale  # [B, KVH, G, E]
    scores = scores.masked_fill(~row_valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, KVH, G]
    # Rows that saw no key: every score is -inf; subtracting 0 keeps their weights at 0.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.einsum("bhge,behd->bhgd", torch.exp(scores - safe_lse[..., None]), v)
    return out.reshape(batch, heads, dim), lse.reshape(batch, heads)


# Bytes of gathered keys per chunk of sequences in paged_key_attention_mass: a bounded
# transient next to a pool that fills most of the device.
MASS_GATHER_BYTES = 256 * 1024**2


def paged_key_attention_mass(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    seq_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """H2O importance: the softmax mass each cached key received from each sequence's query,
    summed over heads -> mass [B, max_pages * P] float32, row r of sequence b at [b, r]
    (rows at or past seq_lens[b], or before seq_starts[b], get 0).

    lse [B, H] is the GLOBAL log-sum-exp of each query (a ring's merged one); None computes it
    from these keys, exact for a sequence held whole here. All sequences of a chunk in a few
    batched kernels, whatever their lengths: no host sync, no loop over sequences."""
    batch, heads, dim = q.shape
    _, kv_heads, page, _ = k_pool.shape
    width = block_table.shape[1]
    group = heads // kv_heads
    mass = torch.zeros(batch, width * page, dtype=torch.float32, device=q.device)
    per_sequence = width * page * kv_heads * dim * k_pool.element_size()
    chunk = max(1, MASS_GATHER_BYTES // max(per_sequence, 1))
    rows = torch.arange(width * page, device=q.device)
    for lo in range(0, batch, chunk):
        hi = min(batch, lo + chunk)
        keys = k_pool[block_table[lo:hi].long()]  # [b, W, KVH, P, d]
        keys = keys.permute(0, 2, 1, 3, 4).reshape(hi - lo, kv_heads, width * page, dim)
        qg = q[lo:hi].reshape(hi - lo, kv_heads, group, dim).to(keys.dtype)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [b, KVH, G, W*P]
        valid = rows[None, :] < seq_lens[lo:hi, None]  # [b, W*P]
        if seq_starts is not None:
            valid &= rows[None, :] >= seq_starts[lo:hi, None]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        if lse is None:
            chunk_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        else:
            chunk_lse = lse[lo:hi].float().reshape(hi - lo, kv_heads, group, 1)
        probs = torch.exp(scores - chunk_lse).nan_to_num_(0.0)  # an empty sequence: -inf - -inf
        mass[lo:hi] = probs.sum(dim=(1, 2))
    return mass


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    splits: int | None = None,
    need_lse: bool = True,
    seq_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, H, d] over each sequence's paged K/V -> (out [B, H, d], lse [B, H]), float32.

    splits: Triton programs per (sequence, kv head), a power of two (None: default_splits).
    need_lse False (nothing to merge, no importance pass): off the kernel's path, one fused SDPA
    call over the batch's gathered rows replaces the per-sequence reference, and lse is None."""
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape or q.shape[2] != k_pool.shape[3]:
        raise ValueError(f"want q [B, H, d], pools [pages, KVH, P, d]; got {q.shape}, {k_pool.shape}, {v_pool.shape}")
    if q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k_pool.shape[1]}")
    if kernel_supports(q, k_pool, v_pool):
        splits = splits or default_splits(q.shape[0], k_pool.shape[1])
        return _paged_decode_triton(q, k_pool, v_pool, block_table, seq_lens, scale, splits, seq_starts)
    if not need_lse:
        return _paged_decode_sdpa(q, k_pool, v_pool, block_table, seq_lens, scale, seq_starts), None
    return paged_decode_attention_reference(q, k_pool, v_pool, block_table, seq_lens, scale, seq_starts)


def _paged_decode_sdpa(q, k_pool, v_pool, block_table, seq_lens, scale, seq_starts=None) -> torch.Tensor:
    """The batch in one fused call: every sequence's pages gathered to the widest one's length,
    the rows past each sequence's length masked. Every sequence needs at least one row."""
    batch, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    pages = block_table.long()  # [B, W]
    k = k_pool[pages].transpose(1, 2).reshape(batch, kv_heads, -1, dim)  # [B, KVH, W * P, d]
    v = v_pool[pages].transpose(1, 2).reshape(batch, kv_heads, -1, dim)
    rows = torch.arange(k.shape[2], device=q.device)[None, :]
    seen = rows < seq_lens[:, None]  # [B, W * P]
    if seq_starts is not None:
        seen &= rows >= seq_starts[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.to(q.dtype), v.to(q.dtype), attn_mask=seen[:, None, None, :], scale=scale, enable_gqa=True)
    return out[:, :, 0].float()  # [B, H, d]


def kernel_supports(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these inputs (else the reference path runs)."""
    page, dim = k_pool.shape[2], k_pool.shape[3]
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in KERNEL_DTYPES
        and k_pool.dtype == v_pool.dtype == q.dtype
        and _pow2(page) and page >= DOT_MIN
        and _pow2(dim) and MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM
    )


def default_splits(batch: int, kv_heads: int) -> int:
    """Programs per (sequence, kv head) when the caller names none: a power of two."""
    want = -(-TARGET_PROGRAMS // max(batch * kv_heads, 1))
    return min(max(1 << (want - 1).bit_length(), MIN_SPLITS), MAX_SPLITS)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _paged_decode_triton(q, k_pool, v_pool, block_table, seq_lens, scale, splits, seq_starts=None):
    if not _pow2(splits):
        raise ValueError(f"splits must be a power of two, got {splits}")
    batch, heads, dim = q.shape
    kv_heads, page = k_pool.shape[1], k_pool.shape[2]
    group = heads // kv_heads
    out = torch.empty(batch, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    q = q.contiguous()
    # No copies when already int32 and contiguous; a copy made here is captured with the launch,
    # so graph replays still follow in-place edits of the caller's tensors.
    block_table = block_table.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32).contiguous()
    seq_starts = torch.zeros_like(seq_lens) if seq_starts is None else seq_starts.to(torch.int32).contiguous()
    part_out = torch.empty(batch, splits, heads, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, splits, heads, dtype=torch.float32, device=q.device)
    block_n = min(page, MAX_BLOCK_N, TILE_ELEMENTS // dim)
    with torch.cuda.device(q.device):  # Triton launches on the current device
        _split_kernel[(batch, kv_heads, splits)](
            q, k_pool, v_pool, block_table, seq_lens, seq_starts, part_out, part_lse,
            scale * LOG2E, block_table.shape[1], heads,
            q.stride(0), q.stride(1),
            *k_pool.stride(), *v_pool.stride(),
            *block_table.stride(),
            GROUP=group, GROUP_PAD=max(DOT_MIN, triton.next_power_of_2(group)), HEAD_DIM=dim,
            PAGE=page, BLOCK_N=block_n, SPLITS=splits, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
        _merge_kernel[(batch, heads)](part_out, part_lse, out, lse, heads, HEAD_DIM=dim, SPLITS=splits)
    return out, lse


if triton is not None:
    LN2 = tl.constexpr(math.log(2))

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, starts_ptr, part_out_ptr, part_lse_ptr,
        qk_scale, max_pages, heads,  # qk_scale = scale * log2(e): the softmax runs in base 2
        stride_qb, stride_qh,
        stride_kp, stride_kh, stride_ks, stride_kd,
        stride_vp, stride_vh, stride_vs, stride_vd,
        stride_tb, stride_tp,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        """Program (b, kv head h, split s): the GQA group of h over split s's pages of sequence b."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        TILES_PER_PAGE: tl.constexpr = PAGE // BLOCK_N
        seq_len = tl.load(lens_ptr + b)
        seq_start = tl.load(starts_ptr + b)  # rows before it are outside the window
        n_pages = tl.minimum(tl.cdiv(seq_len, PAGE), max_pages)  # never read past the table row
        start_page = tl.minimum(seq_start // PAGE, n_pages)
        per_split = tl.cdiv(n_pages - start_page, SPLITS)
        first_page = start_page + split * per_split
        last_page = tl.minimum(first_page + per_split, n_pages)  # <= first_page: an empty split
        # Tiles of BLOCK_N rows; only the first (row seq_start) and the last (row seq_len - 1)
        # are partial, none is empty; no tile at all when the window left every row.
        tile_lo = tl.maximum(first_page * TILES_PER_PAGE, seq_start // BLOCK_N)
        tile_hi = tl.minimum(last_page * TILES_PER_PAGE, tl.cdiv(seq_len, BLOCK_N))
        tile_hi = tl.where(seq_start < seq_len, tile_hi, tile_lo)

        rows = tl.arange(0, GROUP_PAD)  # query rows of the group; rows >= GROUP are padding
        row_ok = rows < GROUP
        head = kvh * GROUP + rows  # [GROUP_PAD]
        dims = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of base-2 scores
        l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)  # [GROUP_PAD, d]
        table_row = table_ptr + b * stride_tb
        for t in range(tile_lo, tile_hi):
            page_id = tl.load(table_row + (t // TILES_PER_PAGE) * stride_tp).to(tl.int64)  # int64: pools > 2^31
            slot = (t % TILES_PER_PAGE) * BLOCK_N + offs_n  # [BLOCK_N]
            row = t * BLOCK_N + offs_n
            valid = (row < seq_len) & (row >= seq_start)  # [BLOCK_N]
            k_off = page_id * stride_kp + kvh * stride_kh + slot[:, None] * stride_ks + dims[None, :] * stride_kd
            v_off = page_id * stride_vp + kvh * stride_vh + slot[:, None] * stride_vs + dims[None, :] * stride_vd
            k = tl.load(k_ptr + k_off, mask=valid[:, None], other=0.0)  # [BLOCK_N, d]
            v = tl.load(v_ptr + v_off, mask=valid[:, None], other=0.0)  # [BLOCK_N, d]
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [GROUP_PAD, BLOCK_N] float32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))  # finite: every tile has a valid row
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        seen = l > 0.0  # false for every row of an empty split
        out = acc / tl.where(seen, l, 1.0)[:, None]
        lse = tl.where(seen, (m + tl.log2(l)) * LN2, float("-inf"))  # base 2 back to natural log
        part = b * SPLITS + split  # row of part_out [B * SPLITS, H, d], int64
        tl.store(part_out_ptr + (part * heads + head[:, None]) * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part * heads + head, lse, mask=row_ok)

    @triton.jit
    def _merge_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, heads, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr
    ):
        """Program (b, h): merge the SPLITS partials of query head h, as merge_partials does."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        splits = tl.arange(0, SPLITS)
        dims = tl.arange(0, HEAD_DIM)
        part = b * SPLITS + splits  # [SPLITS]
        lse_s = tl.load(part_lse_ptr + part * heads + h)  # [SPLITS]
        top = tl.max(lse_s, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # all empty: weights exp(-inf) = 0
        w = tl.exp(lse_s - top)  # [SPLITS]
        total = tl.sum(w, 0)
        o = tl.load(part_out_ptr + (part[:, None] * heads + h) * HEAD_DIM + dims[None, :])  # [SPLITS, d]
        seen = total > 0.0
        out = tl.sum(w[:, None] * o, 0) / tl.where(seen, total, 1.0)
        tl.store(out_ptr + (b * heads + h) * HEAD_DIM + dims, out)
        tl.store(lse_ptr + b * heads + h, tl.where(seen, top + tl.log(total), float("-inf")))
