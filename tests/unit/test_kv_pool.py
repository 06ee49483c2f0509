"""The worker's paged KV pool: rows written through a request's pages read back the same, per
layer and for all layers at once, also after a CPU pool has grown."""

import torch

from services.worker.kv_cache import SCRATCH_PAGE, KVPool, RequestKV

LAYERS, KV_HEADS, DIM, PAGE = 3, 2, 4, 4


def test_rows_read_back_per_layer_and_all_layers_at_once_after_growth():
    torch.manual_seed(0)
    pool = KVPool(LAYERS, KV_HEADS, DIM, PAGE, pages=2, dtype=torch.float32, device=torch.device("cpu"),
                  growable=True)
    other = RequestKV("other", 0, pool)  # interleaves its pages with the request's
    kv = RequestKV("r", 0, pool)
    keys = [torch.randn(11, KV_HEADS, DIM) for _ in range(LAYERS)]
    values = [torch.randn(11, KV_HEADS, DIM) for _ in range(LAYERS)]
    for lo, hi in ((0, 3), (3, 7), (7, 11)):  # appended in pieces, the pool growing on the way
        kv.extend([k[lo:hi] for k in keys], [v[lo:hi] for v in values])
        other.extend([torch.zeros(2, KV_HEADS, DIM)] * LAYERS, [torch.zeros(2, KV_HEADS, DIM)] * LAYERS)
    assert pool.pages > 2 and len(set(kv.pages) & set(other.pages)) == 0
    for layer in range(LAYERS):
        torch.testing.assert_close(kv.keys(layer), keys[layer], rtol=0, atol=0)
        torch.testing.assert_close(kv.values(layer, 2, 9), values[layer][2:9], rtol=0, atol=0)
    host_k, host_v = kv.rows_to_host(5, 10)
    assert len(host_k) == len(host_v) == LAYERS
    for layer in range(LAYERS):
        torch.testing.assert_close(host_k[layer], keys[layer][5:10], rtol=0, atol=0)
        torch.testing.assert_close(host_v[layer], values[layer][5:10], rtol=0, atol=0)
    # the host copy is the caller's: later writes to the pool do not show through
    pool.k[0].zero_()
    torch.testing.assert_close(host_k[0], keys[0][5:10], rtol=0, atol=0)
    assert pool.k[0].data_ptr() == pool.k_layers.data_ptr()  # the per-layer tensors are views


def test_pages_behind_the_window_go_back_sinks_stay_and_a_shared_page_only_loses_this_hold():
    pool = KVPool(LAYERS, KV_HEADS, DIM, PAGE, pages=8, dtype=torch.float32, device=torch.device("cpu"))
    kv = RequestKV("r", 0, pool)
    rows = 6 * PAGE
    kv.extend([torch.randn(rows, KV_HEADS, DIM)] * LAYERS, [torch.randn(rows, KV_HEADS, DIM)] * LAYERS)
    kept_keys = kv.keys(0, 4 * PAGE, rows)
    pages = list(kv.pages)
    pool.retain([pages[2]])  # another holder (a resident prefix block) shares page 2
    assert pool.free_pages == 2

    # rows [0, 4P + 1) are behind the window; the first row is a sink: page 0 stays
    assert kv.free_behind(4 * PAGE + 1, sink_rows=1) == 3  # pages 1, 2, 3
    assert kv.pages == [pages[0], SCRATCH_PAGE, SCRATCH_PAGE, SCRATCH_PAGE, pages[4], pages[5]]  # same length
    assert pool.free_pages == 2 + 2  # page 2 is still the other holder's
    assert kv.freed_pages == 3 and kv.held_tokens == rows - 3 * PAGE
    torch.testing.assert_close(kv.keys(0, 4 * PAGE, rows), kept_keys, rtol=0, atol=0)  # the window is untouched
    assert kv.free_behind(4 * PAGE + 1, sink_rows=1) == 0  # nothing more behind it

    # a reader on another thread holds the rows: nothing goes back until it lets go
    assert kv.acquire()
    assert kv.free_behind(5 * PAGE, sink_rows=1) == 0
    kv.unacquire()
    assert kv.free_behind(5 * PAGE, sink_rows=1) == 1  # page 4, caught up

    kv.free()  # the rest; the scratch entries are not given back (the scratch page is never free)
    assert SCRATCH_PAGE not in pool._free and pool.free_pages == 8 - 1  # page 2: still held by the other
    pool.free([pages[2]])
    assert pool.free_pages == 8
