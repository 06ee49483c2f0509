"""Chat messages -> prompt text with the checkpoint's chat template, rendered as transformers'
`apply_chat_template` renders it: a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, `raise_exception`, a `tojson` that does not escape
HTML, `strftime_now`, the tokenizer's special tokens and `add_generation_prompt`.

The template comes from `chat_template.jinja` or `tokenizer_config.json`'s `chat_template` (a
string, or a list of named templates: `default` is used); the demo checkpoint has none, so it
gets DEMO_CHAT_TEMPLATE.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves a checkpoint's template
DEFAULT_TEMPLATE_NAME = "default"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# The demo model (a byte-level tokenizer, random weights) has no template of its own: a small
# one in the style of Zephyr's, starting with BOS like Llama templates do.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template raised (`raise_exception`) or failed to render these messages."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def jinja_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (templates are untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = jinja_environment().from_string(source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get(DEFAULT_TEMPLATE_NAME)
    return template if isinstance(template, str) else None


def load_chat_template(checkpoint: Path, demo: bool = False) -> ChatTemplate | None:
    """The checkpoint's chat template with its special tokens; DEMO_CHAT_TEMPLATE for the demo;
    None when a real checkpoint has none (chat requests are then refused)."""
    config_file = checkpoint / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template_file = checkpoint / TEMPLATE_FILE
    source = template_file.read_text() if template_file.is_file() else _template_source(config)
    if source is None and demo:
        source = DEMO_CHAT_TEMPLATE
    if source is None:
        return None
    special = {key: token for key in SPECIAL_TOKEN_KEYS if (token := _token_content(config.get(key))) is not None}
    return ChatTemplate(source, special)
