"""KV that fits (issue 12 item 4), the rule both sides use: which requests free behind their
window, how much KV one worker then needs, and admission placing a windowed prompt longer than
a worker's capacity on it while a full-attention one of the same length is refused."""

from shared.attention.kv_need import freeing_pattern, one_worker_kv_tokens, windowed_kv_tokens
from shared.attention.pattern import KeyPattern
from shared.messages import AttentionSpec, GenerateRequest, ModelInfo
from shared.settings import Settings
from services.scheduler.placement import WorkerLoad, choose_workers, fits_cluster, windowed_need

WINDOW, SINKS, STEP, PAGE = 64, 4, 128, 16


def test_sliding_and_hybrid_requests_and_all_sliding_models_free_strided_and_mixed_do_not():
    sliding, hybrid = KeyPattern(window=WINDOW), KeyPattern(window=WINDOW, sinks=SINKS)
    full_layers, all_sliding, mixed = [None, None], [WINDOW, WINDOW], [None, WINDOW]
    assert freeing_pattern(sliding, full_layers, stores_blocks=False) == sliding
    assert freeing_pattern(hybrid, mixed, stores_blocks=False) == hybrid  # a pattern applies in every layer
    assert freeing_pattern(KeyPattern(window=WINDOW, stride=8), full_layers, stores_blocks=False) is None
    assert freeing_pattern(None, all_sliding, stores_blocks=False) == KeyPattern(window=WINDOW)
    assert freeing_pattern(None, mixed, stores_blocks=False) is None
    assert freeing_pattern(None, full_layers, stores_blocks=False) is None
    assert freeing_pattern(None, all_sliding, stores_blocks=True) is None  # the prefix store reads its rows


def test_one_worker_needs_sinks_window_and_a_chunk_whatever_the_prompt():
    bound = windowed_kv_tokens(KeyPattern(window=WINDOW, sinks=SINKS), STEP, PAGE)
    assert bound == PAGE + WINDOW + STEP + 2 * PAGE  # the sinks take a page
    for total in (10, 10_000, 1_000_000):
        assert one_worker_kv_tokens(KeyPattern(window=WINDOW, sinks=SINKS), [None], False, total, STEP, PAGE) \
            == min(total, bound)
        assert one_worker_kv_tokens(None, [None], False, total, STEP, PAGE) == total


def test_admission_places_a_windowed_prompt_longer_than_the_workers_kv_on_it():
    settings = Settings(prefill_step_tokens=STEP, kv_block_tokens=PAGE)
    model = ModelInfo(name="m", num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=300,
                      max_position_embeddings=1 << 20, dtype="float32")
    prompt, new = 100_000, 16
    hybrid = GenerateRequest(input_ids=[1], max_new_tokens=new,
                             attention=AttentionSpec(mode="hybrid", window=WINDOW, sinks=SINKS))
    windowed = windowed_need(hybrid, model, settings)
    assert windowed == windowed_kv_tokens(KeyPattern(window=WINDOW, sinks=SINKS), STEP, PAGE)
    assert windowed_need(GenerateRequest(input_ids=[1], max_new_tokens=new), model, settings) is None
    worker = WorkerLoad(worker_id="w", world_rank=None, in_ring=False, active_requests=0, kv_tokens=0,
                        capacity_tokens=4 * windowed)
    assert fits_cluster(prompt, new, [worker], settings, world_ready=False, windowed=windowed)
    assert choose_workers(prompt, STEP, [worker], settings, False, new, windowed=windowed) == [worker]
    assert not fits_cluster(prompt, new, [worker], settings, world_ready=False)  # full attention: too long
    busy = WorkerLoad(worker_id="w", world_rank=None, in_ring=False, active_requests=3, kv_tokens=3 * windowed + 1,
                      capacity_tokens=4 * windowed)
    assert choose_workers(prompt, STEP, [busy], settings, False, new, windowed=windowed) == []  # no room now
