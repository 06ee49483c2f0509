"""The `demo` model: a small random Llama written as a real Hugging Face checkpoint directory.

It exercises every code path of a real model (GQA, long rope, byte-level tokenizer) while running
fast on a CPU. Its weights are random but deterministic (fixed seed), so the same bytes are written
every time; they are scaled so that logits vary and greedy text does not collapse to one token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

DEMO_MODEL_NAME = "demo"
# Bump when the demo's config, weights or tokenizer change: stale directories are then replaced.
DEMO_FORMAT_VERSION = 1
_VERSION_KEY = "ringserve_demo_version"
DEMO_SEED = 20240229

NUM_BYTE_TOKENS = 256
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_TOKEN_ID, EOS_TOKEN_ID = NUM_BYTE_TOKENS, NUM_BYTE_TOKENS + 1

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": NUM_BYTE_TOKENS + 2,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0},
    "max_position_embeddings": 1_048_576,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "dtype": "float32",
    _VERSION_KEY: DEMO_FORMAT_VERSION,
}

# Weight scales. Projections get std gain/sqrt(fan_in), which keeps activations near unit size;
# the lm_head's larger gain spreads the logits enough for greedy decoding to vary.
_EMBED_STD = 1.0
_PROJECTION_GAIN = 1.0
_LM_HEAD_GAIN = 4.0
_NORM_WEIGHT_JITTER = 0.1

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def ensure_demo_checkpoint(directory: str | Path) -> Path:
    """Materialise the demo checkpoint in directory (once; concurrent callers are safe) and return it."""
    target = Path(directory)
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed into place: readers never see a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        write_demo_checkpoint(staging)
        _retire_stale_demo(target)
        try:
            os.rename(staging, target)
        except OSError:
            pass  # target is non-empty: a concurrent caller installed it first (checked below)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _is_current(target):
        raise FileExistsError(f"{target} exists and is not the demo checkpoint; choose another demo_dir")
    return target


def write_demo_checkpoint(directory: str | Path) -> None:
    """Write the demo's files into an existing directory."""
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2, sort_keys=True) + "\n")
    save_file(demo_state_dict(), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "tokenizer.json").write_text(byte_tokenizer().to_str(pretty=True))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def demo_state_dict() -> dict[str, torch.Tensor]:
    """The demo's weights, named as in a Hugging Face Llama state dict."""
    c = DEMO_CONFIG
    hidden, inner, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_dim = c["num_attention_heads"] * c["head_dim"]
    kv_dim = c["num_key_value_heads"] * c["head_dim"]
    generator = torch.Generator().manual_seed(DEMO_SEED)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).contiguous()

    def projection(out_dim: int, in_dim: int, gain: float = _PROJECTION_GAIN) -> torch.Tensor:
        return normal(out_dim, in_dim, std=gain / in_dim**0.5)

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(hidden, std=_NORM_WEIGHT_JITTER)

    state = {"model.embed_tokens.weight": normal(vocab, hidden, std=_EMBED_STD)}
    for i in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        state[prefix + "self_attn.q_proj.weight"] = projection(q_dim, hidden)
        state[prefix + "self_attn.k_proj.weight"] = projection(kv_dim, hidden)
        state[prefix + "self_attn.v_proj.weight"] = projection(kv_dim, hidden)
        state[prefix + "self_attn.o_proj.weight"] = projection(hidden, q_dim)
        state[prefix + "mlp.gate_proj.weight"] = projection(inner, hidden)
        state[prefix + "mlp.up_proj.weight"] = projection(inner, hidden)
        state[prefix + "mlp.down_proj.weight"] = projection(hidden, inner)
        state[prefix + "input_layernorm.weight"] = norm_weight()
        state[prefix + "post_attention_layernorm.weight"] = norm_weight()
    state["model.norm.weight"] = norm_weight()
    state["lm_head.weight"] = projection(vocab, hidden, gain=_LM_HEAD_GAIN)
    return state


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: token i is byte i (GPT-2's printable byte alphabet), then <s> and </s>."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(NUM_BYTE_TOKENS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)]
    )
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters, which byte-level tokenizers name tokens with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    unprintable = [b for b in range(NUM_BYTE_TOKENS) if b not in chars]
    for n, b in enumerate(unprintable):
        chars[b] = chr(NUM_BYTE_TOKENS + n)
    return chars


def _read_version(directory: Path) -> int | None:
    try:
        return json.loads((directory / "config.json").read_text()).get(_VERSION_KEY)
    except (OSError, ValueError):
        return None


def _is_current(directory: Path) -> bool:
    return _read_version(directory) == DEMO_FORMAT_VERSION and all((directory / f).is_file() for f in _FILES)


def _retire_stale_demo(target: Path) -> None:
    """Move an older demo version out of the way (never a directory that is not a demo)."""
    if _read_version(target) in (None, DEMO_FORMAT_VERSION):
        return
    retired = target.with_name(f".{target.name}.retired-{uuid.uuid4().hex}")
    try:
        os.rename(target, retired)
    except OSError:
        return  # a concurrent caller retired it already
    shutil.rmtree(retired, ignore_errors=True)
