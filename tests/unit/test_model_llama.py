"""The decoder's pieces as the worker drives them: shapes, chunked positions, dtypes, refusals."""

from __future__ import annotations

import pytest
import torch

from shared.model import LlamaModel, parse_model_config
from tests.helpers.checkpoints import causal_attention

TOKENS = 12


def _model(**overrides) -> LlamaModel:
    raw = {
        "model_type": "llama", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    }
    torch.manual_seed(0)
    return LlamaModel(parse_model_config({**raw, **overrides})).eval()


def test_layer_pieces_have_flat_token_shapes():
    model = _model()
    positions = torch.arange(TOKENS)
    cos, sin = model.rope(positions, TOKENS)
    assert cos.shape == sin.shape == (TOKENS, 8) and cos.dtype == torch.float32
    h = model.embed(torch.arange(TOKENS))
    assert h.shape == (TOKENS, 32)
    q, k, v = model.layers[0].qkv(h, cos, sin)
    assert q.shape == (TOKENS, 4, 8) and k.shape == v.shape == (TOKENS, 2, 8)
    assert model.layers[0].finish(h, torch.zeros_like(q)).shape == (TOKENS, 32)
    assert model.logits(h).shape == (TOKENS, 50)


def test_a_chunk_of_positions_gets_the_rows_of_the_whole_sequence():
    # Ring prefill: each worker ropes its own chunk with the whole prompt's length (dynamic NTK depends on it).
    model = _model()
    cos, sin = model.rope(torch.arange(TOKENS), TOKENS)
    chunk = torch.tensor([4, 5, 6, 10])
    chunk_cos, chunk_sin = model.rope(chunk, TOKENS)
    torch.testing.assert_close(chunk_cos, cos[chunk], rtol=0, atol=0)
    torch.testing.assert_close(chunk_sin, sin[chunk], rtol=0, atol=0)
    assert not torch.equal(model.rope(chunk, 11)[0], chunk_cos)  # beyond max positions the length matters


def test_prefill_in_two_chunks_equals_one_pass():
    model = _model()
    ids = torch.randint(0, 50, (TOKENS,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(ids, torch.arange(TOKENS), lambda _i, q, k, v: causal_attention(q, k, v, model.attn_scale, 0))

        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def attend(layer: int, q, k, v, start: int):
            if layer in cache:
                k, v = torch.cat([cache[layer][0], k]), torch.cat([cache[layer][1], v])
            cache[layer] = (k, v)
            return causal_attention(q, k, v, model.attn_scale, q_start=start)

        half = TOKENS // 2
        first = model(ids[:half], torch.arange(half), lambda i, q, k, v: attend(i, q, k, v, 0), seq_len=TOKENS)
        second = model(ids[half:], torch.arange(half, TOKENS), lambda i, q, k, v: attend(i, q, k, v, half))
    torch.testing.assert_close(torch.cat([first, second]), whole)


def test_bfloat16_layers_take_float32_attention_output():
    model = _model().to(torch.bfloat16)
    h = model.embed(torch.arange(3))
    out = model.layers[0].finish(h, torch.ones(3, 4, 8, dtype=torch.float32))
    assert out.dtype == torch.bfloat16
    assert model.logits(out).dtype == torch.float32


def test_softmax_scale_is_inverse_sqrt_head_dim():
    assert _model(head_dim=16).attn_scale == pytest.approx(0.25)


def test_fused_projections_compute_what_the_separate_ones_do():
    """The loader stacks q/k/v and gate/up into one weight each: same outputs, same state dict."""
    raw = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64}  # qwen2: q/k/v biases
    torch.manual_seed(0)
    model = LlamaModel(parse_model_config(raw)).eval()
    for p in model.parameters():  # non-zero biases, so a misplaced bias row shows
        torch.nn.init.normal_(p, std=0.2)
    h = torch.randn(5, 32)
    cos, sin = model.rope(torch.arange(5), seq_len=5)
    layer = model.layers[0]
    with torch.no_grad():
        before = layer.qkv(h, cos, sin), layer.finish(h, torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1)))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.fuse_projections()
        after = layer.qkv(h, cos, sin), layer.finish(h, torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1)))
    for a, b in zip(before[0], after[0]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], before[1], atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
