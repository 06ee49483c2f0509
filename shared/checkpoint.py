"""Where the model checkpoint lives: a Hugging Face directory, or the demo model materialised."""

from __future__ import annotations

from pathlib import Path

from shared.settings import Settings


def resolve_checkpoint(settings: Settings) -> Path:
    if settings.model == "demo":
        from shared.model.demo import ensure_demo_checkpoint

        return Path(ensure_demo_checkpoint(Path(settings.demo_dir)))
    path = Path(settings.model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"RINGSERVE_MODEL={settings.model!r}: no config.json there (a Hugging Face checkpoint directory, or 'demo')")
    return path


def model_id(settings: Settings) -> str:
    """A stable name for the model, used in KV block keys and status replies."""
    return "demo" if settings.model == "demo" else Path(settings.model).expanduser().resolve().name
