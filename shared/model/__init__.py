"""The Llama-family model: config parsing, rope, the decoder in pieces, loading, tokenizer, demo checkpoint."""

from shared.model.config import ModelConfig, RopeConfig, UnsupportedModel, parse_model_config
from shared.model.demo import DEMO_MODEL_NAME, ensure_demo_checkpoint
from shared.model.llama import AttendFn, DecoderLayer, LlamaModel
from shared.model.loader import CheckpointError, load_config, load_model
from shared.model.rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_half
from shared.model.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer

__all__ = [
    "DEMO_MODEL_NAME",
    "AttendFn",
    "CheckpointError",
    "DecoderLayer",
    "IncrementalDecoder",
    "LlamaModel",
    "ModelConfig",
    "RopeConfig",
    "Tokenizer",
    "UnsupportedModel",
    "apply_rope",
    "ensure_demo_checkpoint",
    "load_config",
    "load_model",
    "load_tokenizer",
    "parse_model_config",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
]
