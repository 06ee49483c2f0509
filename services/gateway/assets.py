"""What the gateway reads from the checkpoint: its chat template and tokenizer (never the weights).
A checkpoint the gateway cannot see (not mounted where it runs) leaves chat unavailable, not the
gateway down: completions need neither."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from services.gateway.chat_template import ChatTemplate, load_chat_template
from services.gateway.prompt_tokens import PromptTokenizer
from shared.checkpoint import resolve_checkpoint
from shared.settings import Settings

log = structlog.get_logger("gateway")


@dataclass
class PromptAssets:
    template: ChatTemplate | None
    tokenizer: PromptTokenizer | None


def load_prompt_assets(settings: Settings) -> PromptAssets:
    try:
        checkpoint = resolve_checkpoint(settings)
    except (FileNotFoundError, OSError) as exc:
        log.warning("checkpoint_unavailable", model=settings.model, error=str(exc)[:300])
        return PromptAssets(None, None)
    assets = PromptAssets(load_chat_template(checkpoint, demo=settings.model == "demo"), PromptTokenizer.load(checkpoint))
    log.info("prompt_assets_loaded", model=settings.model, chat_template=assets.template is not None,
             tokenizer=assets.tokenizer is not None)
    return assets
