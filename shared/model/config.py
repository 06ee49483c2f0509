"""The model's shape and options, parsed from a Hugging Face `config.json` of a Llama-family model.

Field names follow Hugging Face's so a reader can check them against the checkpoint. Everything this
engine does not implement is refused here with `UnsupportedModel`, before any weight is read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# Model types whose weights and maths are exactly the Llama decoder below.
LLAMA_SHAPED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Checkpoints with a custom `model_type` are still accepted when they declare one of these classes.
LLAMA_SHAPED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "swish")

# Hugging Face's defaults for keys a config.json may leave out.
DEFAULT_ROPE_THETA = 10_000.0
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_YARN_BETA_FAST = 32.0
DEFAULT_YARN_BETA_SLOW = 1.0
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28

RopeType = Literal["default", "linear", "dynamic", "yarn", "llama3"]


class UnsupportedModel(ValueError):
    """The checkpoint uses something this engine does not implement (architecture, rope type, window...)."""


class RopeConfig(BaseModel):
    """Rotary embedding options; which fields matter depends on `rope_type` (see shared/model/rope.py)."""

    model_config = ConfigDict(frozen=True)

    rope_type: RopeType = "default"
    rope_theta: float = DEFAULT_ROPE_THETA
    factor: float = 1.0
    # llama3 and yarn: the context length the model was pretrained with.
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn
    attention_factor: float | None = None
    beta_fast: float = DEFAULT_YARN_BETA_FAST
    beta_slow: float = DEFAULT_YARN_BETA_SLOW
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    # Bias on q/k/v projections (Llama's `attention_bias`; always on for Qwen2).
    qkv_bias: bool = False
    # Bias on o_proj (Llama's `attention_bias`; never for Qwen2).
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Sliding-window attention (Mistral, Qwen2 with use_sliding_window): a query at position i sees
    # the keys at positions j with i - W < j <= i, in the layers `sliding_layers` names; None: none.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def window_of(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full causal attention)."""
        return self.sliding_window if layer in self.sliding_layers else None


def token_ids(value: Any) -> tuple[int, ...]:
    """A config's token id field (int, list of ints or null) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    """Parse a config.json dict; raises UnsupportedModel for anything the decoder cannot run."""
    model_type = raw.get("model_type", "")
    architectures = raw.get("architectures") or []
    if model_type not in LLAMA_SHAPED_MODEL_TYPES and not set(architectures) & set(LLAMA_SHAPED_ARCHITECTURES):
        raise UnsupportedModel(
            f"model_type {model_type!r} (architectures {architectures}) is not Llama-shaped; "
            f"supported: {', '.join(LLAMA_SHAPED_MODEL_TYPES)}"
        )
    if raw.get("quantization_config"):
        raise UnsupportedModel("quantized checkpoints are not supported; use float16/bfloat16/float32 weights")
    activation = raw.get("hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModel(f"hidden_act {activation!r} is not supported; only SwiGLU (silu)")

    hidden = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UnsupportedModel(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    if model_type == "qwen2":
        qkv_bias, o_proj_bias = True, False
    else:
        qkv_bias = o_proj_bias = bool(raw.get("attention_bias", False))

    max_positions = raw["max_position_embeddings"]
    window, sliding = _sliding_window(raw)
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS),
        rope=parse_rope_config(raw),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=token_ids(raw.get("eos_token_id")),
        sliding_window=window,
        sliding_layers=sliding,
    )


def parse_rope_config(raw: dict[str, Any]) -> RopeConfig:
    """Rope options from transformers 5's `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
    # Same precedence as transformers: `rope_scaling` wins, then `rope_parameters`.
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModel("per-layer-type rope parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    partial_rotary = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial_rotary not in (None, 1, 1.0):
        raise UnsupportedModel(f"partial_rotary_factor {partial_rotary} is not supported")

    original_max = None
    if rope_type in ("llama3", "yarn"):
        # transformers lets a top-level value (Phi-3 style) override the one in the rope dict.
        original_max = raw.get(
            "original_max_position_embeddings",
            params.get("original_max_position_embeddings") or raw["max_position_embeddings"],
        )
    factor = params.get("factor")
    if factor is None and rope_type == "yarn":
        factor = raw["max_position_embeddings"] / original_max
    if factor is None and rope_type != "default":
        raise UnsupportedModel(f"rope_type {rope_type!r} needs a `factor`")
    if rope_type == "llama3" and (params.get("low_freq_factor") is None or params.get("high_freq_factor") is None):
        raise UnsupportedModel("rope_type 'llama3' needs low_freq_factor and high_freq_factor")

    return RopeConfig(
        rope_type=rope_type,
        rope_theta=params.get("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA)),
        factor=1.0 if factor is None else factor,
        original_max_position_embeddings=original_max,
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        attention_factor=params.get("attention_factor"),
        # transformers treats 0/None as "use the default" here.
        beta_fast=params.get("beta_fast") or DEFAULT_YARN_BETA_FAST,
        beta_slow=params.get("beta_slow") or DEFAULT_YARN_BETA_SLOW,
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=params.get("truncate", True),
    )


def _sliding_window(raw: dict[str, Any]) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers that slide), by transformers' rules per model type; (None, ()) if none."""
    window = raw.get("sliding_window")
    layers = raw["num_hidden_layers"]
    if window is None:
        return None, ()
    # Qwen2 configs carry a sliding_window that is off unless use_sliding_window is set.
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window", False):
        return None, ()
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    elif raw.get("model_type") == "qwen2":
        # Qwen2 slides only in layers from max_window_layers on.
        first_sliding_layer = raw.get("max_window_layers", QWEN2_DEFAULT_MAX_WINDOW_LAYERS)
        sliding = tuple(range(first_sliding_layer, layers))
    else:
        sliding = tuple(range(layers))
    return (int(window), sliding) if sliding else (None, ())
