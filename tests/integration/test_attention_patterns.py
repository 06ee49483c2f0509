"""Per-request attention patterns through the real services, exact: on a Llama checkpoint whose
config has no window, a request's sliding window gives transformers' Mistral (the same weights,
that `sliding_window`) greedy tokens; hybrid and strided requests give our dense masked reference
decoder's; each on rings of 1 and 3 workers prefilling in chunks that divide no prompt, and each
reply's usage.attention_sparsity is the pattern's, computed from its positions."""

import pytest
import torch

from shared.attention.pattern import KeyPattern, attention_sparsity
from shared.model.loader import load_model
from tests.helpers.checkpoints import greedy_generate, save_tiny_checkpoint, tiny_dims
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

CHUNK = 7  # divides none of the prompt lengths
NEW_TOKENS = 10
WINDOW = 5
PROMPT = [(i * 31 + 11) % 297 + 3 for i in range(40)]  # 8 windows
PATTERNS = {  # the request's `attention` -> the mask it means
    "hybrid": ({"mode": "hybrid", "window": WINDOW, "sinks": 3}, KeyPattern(window=WINDOW, sinks=3)),
    "strided": ({"mode": "strided", "window": WINDOW, "stride": 4}, KeyPattern(window=WINDOW, stride=4)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Llama checkpoint without a window, and transformers' Mistral with its weights and a window."""
    llama_cfg = transformers.LlamaConfig(**tiny_dims(eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny-llama-no-window")
    llama = save_tiny_checkpoint(llama_cfg, path, seed=5)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**tiny_dims(sliding_window=WINDOW,
                                                                                    eos_token_id=2)))
    mistral.load_state_dict(llama.state_dict())  # same parameter names: the window is the only change
    return path, llama, mistral.eval()


def hf_greedy(model, ids):
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def ours_greedy(path, pattern: KeyPattern | None) -> list[int]:
    """Our model, dense attention masked with the pattern in every layer; eos ignored."""
    model = load_model(path)
    return greedy_generate(model.eval(), PROMPT, NEW_TOKENS, pattern)


@pytest.mark.parametrize("workers", [1, 3])
async def test_per_request_patterns_match_their_references(tmp_path_factory, checkpoints, workers):
    path, llama, mistral = checkpoints
    expected = {"full": hf_greedy(llama, PROMPT), "sliding": hf_greedy(mistral, PROMPT)}
    expected.update({name: ours_greedy(path, pattern) for name, (_, pattern) in PATTERNS.items()})
    # the references differ from one another: a request that ignored its pattern would fail
    assert len({tuple(tokens) for tokens in expected.values()}) == len(expected)
    stack = Stack(tmp_path_factory.mktemp(f"stack-patterns-{workers}"), workers=workers,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK)})
    try:
        await stack.wait_ready(workers)
        bodies = {"full": None, "sliding": {"mode": "sliding", "window": WINDOW}}
        bodies.update({name: attention for name, (attention, _) in PATTERNS.items()})
        masks = {"full": None, "sliding": KeyPattern(window=WINDOW)}
        masks.update({name: pattern for name, (_, pattern) in PATTERNS.items()})
        for name, attention in bodies.items():
            body = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}
            if attention is not None:
                body["attention"] = attention
            reply = await stack.generate(body)
            assert "error" not in reply, f"{name}: {reply}\n{stack.logs()}"
            assert len(reply["placement"]["workers"]) == workers
            got = reply["output_ids"]
            assert got == expected[name][: len(got)] and len(got) >= NEW_TOKENS // 2, name
            layers = llama.config.num_hidden_layers
            want = attention_sparsity([masks[name]] * layers, len(PROMPT), len(got))
            assert reply["usage"]["attention_sparsity"] == pytest.approx(want), name
            assert (want > 0) == (name != "full")
        refused = await stack.generate({"input_ids": PROMPT, "attention": {"mode": "strided", "window": 4}})
        assert refused["error"]["code"] == "invalid_request"
    finally:
        stack.stop()


async def test_a_window_other_than_a_sliding_models_own_is_unsupported(tmp_path_factory):
    cfg = transformers.MistralConfig(**tiny_dims(sliding_window=WINDOW, eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny-mistral-window")
    save_tiny_checkpoint(cfg, path, seed=6)
    stack = Stack(tmp_path_factory.mktemp("stack-mistral-unsupported"), workers=1,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK)})
    try:
        await stack.wait_ready(1)
        other = await stack.generate({"input_ids": PROMPT, "max_new_tokens": 2,
                                      "attention": {"mode": "sliding", "window": WINDOW + 1}})
        assert other["error"]["code"] == "unsupported", other
        same = await stack.generate({"input_ids": PROMPT, "max_new_tokens": 2,
                                     "attention": {"mode": "hybrid", "window": WINDOW, "sinks": 2}})
        assert "error" not in same and same["usage"]["attention_sparsity"] > 0, f"{same}\n{stack.logs()}"
    finally:
        stack.stop()


# ---- KV that fits (issue 12 item 4) ------------------------------------------------------------------
SMALL_KV_TOKENS = 64  # the worker's KV capacity: far less than the long prompt
PAGE_TOKENS, STEP_TOKENS = 4, 8
LONG_PROMPT = [(i * 37 + 5) % 297 + 3 for i in range(200)]  # 40 windows, > 3x the capacity


async def test_windowed_requests_longer_than_a_workers_kv_run_on_it_and_full_attention_is_refused(
        tmp_path_factory, checkpoints):
    """One worker whose KV capacity (and pool: one request's decode slack) is far below the prompt:
    sliding and hybrid requests are admitted (sinks + window + a prefill chunk fit), prefilled
    chunk by chunk giving back the pages behind the window, and decode transformers' Mistral's
    (sliding) and the masked reference's (hybrid) tokens; the same prompt with full attention is
    refused `too_long` as before."""
    path, llama, mistral = checkpoints
    expected = {"sliding": hf_greedy(mistral, LONG_PROMPT),
                "hybrid": greedy_generate(load_model(path).eval(), LONG_PROMPT, NEW_TOKENS,
                                          KeyPattern(window=WINDOW, sinks=3))}
    assert expected["sliding"] != expected["hybrid"]
    stack = Stack(tmp_path_factory.mktemp("stack-kv-fits"), workers=1,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_WORKER_MAX_TOKENS": str(SMALL_KV_TOKENS),
                       "RINGSERVE_KV_BLOCK_TOKENS": str(PAGE_TOKENS), "RINGSERVE_PREFILL_STEP_TOKENS": str(STEP_TOKENS),
                       "RINGSERVE_DECODE_MAX_BATCH": "1"})
    try:
        await stack.wait_ready(1)
        for name, attention in (("sliding", {"mode": "sliding", "window": WINDOW}),
                                ("hybrid", {"mode": "hybrid", "window": WINDOW, "sinks": 3})):
            reply = await stack.generate({"input_ids": LONG_PROMPT, "max_new_tokens": NEW_TOKENS,
                                          "ignore_eos": True, "attention": attention})
            assert "error" not in reply, f"{name}: {reply}\n{stack.logs()}"
            assert reply["output_ids"] == expected[name], name
        full = await stack.generate({"input_ids": LONG_PROMPT, "max_new_tokens": NEW_TOKENS})
        assert full["error"]["code"] == "too_long", full
        logs = stack.logs()
        assert "kv_window_freed" in logs and "pages_freed" in logs
    finally:
        stack.stop()
