"""Chat templates: exact Zephyr rendering, ids equal to transformers', load-time validation."""

from __future__ import annotations

import json

import pytest

from zlocal.errors import InvalidArgumentError, TemplateError
from zlocal.inference.runtime import load_chat_template
from zlocal.inference.template import build_template, validate_messages, zephyr_template

PIRATE = [
    {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
    {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
]
PIRATE_PROMPT = (
    "<|system|>\nYou are a friendly chatbot who always responds in the style of a pirate</s>\n"
    "<|user|>\nHow many helicopters can a human eat in one sitting?</s>\n<|assistant|>\n"
)


def test_real_mistral_tokenizer_ids(mistral_tokenizer):
    ids = mistral_tokenizer("Hello world, how are you?")["input_ids"]
    assert ids == [1, 22557, 1526, 28725, 910, 460, 368, 28804]


def test_zephyr_rendering_is_exact(tiny_zephyr):
    _, _, _tok, tpl = load_chat_template(str(tiny_zephyr))
    assert tpl.origin == "checkpoint"
    assert tpl.render(PIRATE) == PIRATE_PROMPT


def test_zephyr_ids_equal_transformers_apply_chat_template(tiny_zephyr, mistral_tokenizer):
    _, _, _, tpl = load_chat_template(str(tiny_zephyr))
    expected = mistral_tokenizer.apply_chat_template(
        PIRATE, chat_template=zephyr_template(), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert tpl.encode(PIRATE) == list(expected)
    assert tpl.stop_token_ids == [mistral_tokenizer.eos_token_id]


def test_zephyr_checkpoint_without_template_gets_builtin(tiny_zephyr_no_template):
    _, _, _, tpl = load_chat_template(str(tiny_zephyr_no_template))
    assert tpl.origin == "builtin-zephyr"
    assert tpl.render(PIRATE) == PIRATE_PROMPT


def test_non_zephyr_checkpoint_without_template_is_an_error(tmp_path, tiny_zephyr_no_template):
    import shutil

    dst = tmp_path / "plain-mistral"
    shutil.copytree(tiny_zephyr_no_template, dst)
    with pytest.raises(TemplateError, match="no chat template"):
        load_chat_template(str(dst))


def test_template_that_fails_to_render_is_rejected_at_load(mistral_tokenizer, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    with pytest.raises(TemplateError):
        build_template(mistral_tokenizer, "x", None, [2], override=bad)


def test_template_without_end_of_turn_token_is_rejected(mistral_tokenizer, tmp_path):
    tpl = tmp_path / "noend.jinja"
    tpl.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    with pytest.raises(TemplateError, match="no special token"):
        build_template(mistral_tokenizer, "x", None, [2], override=tpl)


def test_template_is_sandboxed(mistral_tokenizer, tmp_path):
    evil = tmp_path / "evil.jinja"
    evil.write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    with pytest.raises(TemplateError):
        build_template(mistral_tokenizer, "x", None, [2], override=evil)


def test_system_role_folded_when_template_has_none(mistral_tokenizer, tmp_path):
    # Mistral-instruct style: no system role, raises on it.
    src = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('no system') }}{% elif m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    f = tmp_path / "inst.jinja"
    f.write_text(src)
    tpl = build_template(mistral_tokenizer, "x", None, [2], override=f)
    assert not tpl.supports_system
    text = tpl.render(PIRATE)
    assert text.startswith("<s>[INST] You are a friendly chatbot")
    assert "How many helicopters" in text


@pytest.mark.parametrize(
    "bad",
    [[], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}], [["user", "x"]]],
)
def test_message_validation(bad):
    with pytest.raises(InvalidArgumentError):
        validate_messages(bad)


def test_smollm2_uses_its_own_chatml_template(smollm2):
    _, _, tok, tpl = load_chat_template(str(smollm2))
    text = tpl.render([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in tpl.stop_token_ids


def test_prompt_command_prints_exact_prompt(tiny_zephyr, tmp_path, capsys):
    from zlocal.cli import main

    f = tmp_path / "m.json"
    f.write_text(json.dumps(PIRATE))
    assert main(["prompt", str(tiny_zephyr), "--messages", str(f)]) == 0
    assert capsys.readouterr().out == PIRATE_PROMPT
