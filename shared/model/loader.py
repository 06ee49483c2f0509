"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into a `LlamaModel`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.model.config import ModelConfig, UnsupportedModel, parse_model_config, token_ids
from shared.model.llama import LlamaModel

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"
# Older checkpoints saved this non-persistent buffer; it is recomputed, never loaded.
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
# Error messages name at most this many weights.
_NAMES_IN_ERROR = 5


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete, or its weights do not fit its config."""


def load_config(path: str | Path) -> ModelConfig:
    """Parse config.json; eos ids also include generation_config.json's (as `generate` would stop on them)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: not a Hugging Face checkpoint directory")
    raw = json.loads(config_file.read_text())
    config = parse_model_config(raw)

    generation_file = path / GENERATION_CONFIG_FILE
    if generation_file.is_file():
        extra_eos = token_ids(json.loads(generation_file.read_text()).get("eos_token_id"))
        merged = config.eos_token_ids + tuple(i for i in extra_eos if i not in config.eos_token_ids)
        config = config.model_copy(update={"eos_token_ids": merged})
    return config


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> LlamaModel:
    """Build the model from the checkpoint at path, weights on device in dtype, in eval mode without grads."""
    path = Path(path)
    config = load_config(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = load_state_dict(path, device, dtype)

    for key in [k for k in state if k.endswith(_IGNORED_KEY_SUFFIXES)]:
        del state[key]
    if config.tie_word_embeddings:
        # Tied checkpoints usually omit lm_head; it is the embedding matrix either way.
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")

    # Built on the meta device, so no memory or time goes into weights about to be replaced.
    with torch.device("meta"):
        model = LlamaModel(config)
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise UnsupportedModel(f"{path} has weights this Llama decoder has no place for: {_preview(unexpected)}")
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise CheckpointError(f"{path} lacks weights: {_preview(missing)}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit its config.json: {e}") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.requires_grad_(False)
    return model.fuse_projections()


def load_state_dict(path: str | Path, device: str | torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors file(s), cast to dtype, on device."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(path)):
        for name, tensor in load_file(file, device=str(device)).items():
            state[name] = tensor.to(dtype)
    return state


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a single-file or sharded checkpoint."""
    index_file = path / SHARDED_INDEX_FILE
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / SINGLE_WEIGHTS_FILE).is_file():
        files = [path / SINGLE_WEIGHTS_FILE]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path} (only the safetensors format is supported)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks the weight shards named in its index: {missing}")
    return files


def _preview(names: list[str]) -> str:
    more = f" (+{len(names) - _NAMES_IN_ERROR} more)" if len(names) > _NAMES_IN_ERROR else ""
    return ", ".join(names[:_NAMES_IN_ERROR]) + more
