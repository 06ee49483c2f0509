"""Chat templates render as transformers' apply_chat_template renders them (checked against
transformers itself), and the demo checkpoint gets its own template."""

from __future__ import annotations

import json

import pytest

from services.gateway.chat_template import DEMO_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, load_chat_template
from services.gateway.prompt_tokens import PromptTokenizer
from shared.model.demo import write_demo_checkpoint

# Llama 3's template, shortened: whitespace control, loop variables, raise_exception.
LLAMA3_STYLE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Block tags on their own lines: trim_blocks and lstrip_blocks decide the output's whitespace.
INDENTED = """{% for message in messages %}
    {% if message.role == 'user' %}
[U] {{ message.content | tojson }}
    {% else %}
[{{ message.role }}] {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[A]
{% endif %}"""

MESSAGES = [{"role": "system", "content": "Be <brief> & kind."}, {"role": "user", "content": " Héllo "}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    write_demo_checkpoint(directory)
    return directory


def with_template(checkpoint, tmp_path, template: str):
    target = tmp_path / "ckpt"
    target.mkdir()
    for f in checkpoint.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("template", [LLAMA3_STYLE, INDENTED, DEMO_CHAT_TEMPLATE], ids=["llama3", "indented", "demo"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_and_token_ids_match_transformers(checkpoint, tmp_path, template, add_generation_prompt):
    from transformers import AutoTokenizer

    directory = with_template(checkpoint, tmp_path, template)
    ours = load_chat_template(directory)
    theirs = AutoTokenizer.from_pretrained(str(directory))
    text = ours.render(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = PromptTokenizer.load(directory).encode_rendered(text)
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)


def test_demo_checkpoint_gets_the_demo_template_and_bos_once(checkpoint):
    template = load_chat_template(checkpoint, demo=True)
    assert template.source == DEMO_CHAT_TEMPLATE
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    ids = PromptTokenizer.load(checkpoint).encode_rendered(text)
    assert ids.count(256) == 1 and ids[0] == 256  # BOS written by the template, not added again


def test_a_real_checkpoint_without_a_template_has_none(checkpoint):
    assert load_chat_template(checkpoint, demo=False) is None


def test_named_templates_use_default_and_the_jinja_file_wins(checkpoint, tmp_path):
    directory = with_template(checkpoint, tmp_path, [{"name": "tool_use", "template": "T"},
                                                     {"name": "default", "template": "D{{ eos_token }}"}])
    assert load_chat_template(directory).render([]) == "D</s>"
    (directory / "chat_template.jinja").write_text("J")
    assert load_chat_template(directory).render([]) == "J"


def test_raise_exception_and_the_sandbox_refuse():
    with pytest.raises(ChatTemplateError, match="bad role"):
        ChatTemplate(LLAMA3_STYLE, {"bos_token": "<s>"}).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # templates are untrusted: no attribute escapes
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
