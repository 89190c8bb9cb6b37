"""Streaming detokenization never emits a broken UTF-8 character and never loses one."""

from __future__ import annotations

import pytest

from zlocal.inference.detok import IncrementalDecoder, StopStringFilter

TEXTS = [
    "Hello world, how are you?",
    "鑫鑫 鑫 — 数据库 🦜🦜 𝄞 café naïve 🧑‍🚀!",
    "  leading spaces and\nnew lines\n\n  kept ",
    "日本語のテキストと絵文字🎉🎊を混ぜる",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_deltas_rebuild_the_text_exactly(mistral_tokenizer, text):
    ids = mistral_tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(mistral_tokenizer)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == mistral_tokenizer.decode(ids)


def test_byte_fallback_characters_are_held_until_complete(mistral_tokenizer):
    ids = mistral_tokenizer("🦜", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4  # byte-fallback pieces: the first ones alone are not a character
    dec = IncrementalDecoder(mistral_tokenizer)
    out = [dec.push(i) for i in ids]
    assert all(o == "" for o in out[:-1])
    assert "".join(out) + dec.flush() == mistral_tokenizer.decode(ids)


def test_truncated_character_is_flushed_as_replacement(mistral_tokenizer):
    ids = mistral_tokenizer("a🦜", add_special_tokens=False)["input_ids"][:-1]
    dec = IncrementalDecoder(mistral_tokenizer)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text.startswith("a") and text.endswith("\ufffd")


def test_smollm2_bytelevel_tokenizer(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        dec = IncrementalDecoder(tok)
        deltas = [dec.push(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids)


def test_stop_string_across_chunks_is_cut_and_not_emitted():
    f = StopStringFilter(["</answer>", "STOP"])
    out = [f.feed(c) for c in ["The result", " is 4</an", "swer> and more"]]
    assert "".join(out) == "The result is 4"
    assert f.stopped and f.matched == "</answer>"
    assert f.feed("more") == ""


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    f = StopStringFilter(["###"])
    assert f.feed("a #") == "a "
    assert f.feed("#") == ""  # "##" may still become "###": held back
    assert f.feed(" b") == "## b"  # no longer a possible stop: released
    assert f.flush() == "" and not f.stopped
    f2 = StopStringFilter(["###"])
    text = "".join(f2.feed(c) for c in ["x", "#", "#", "y", "z"]) + f2.flush()
    assert text == "x##yz" and not f2.stopped


def test_no_stop_strings_passthrough():
    f = StopStringFilter([])
    assert f.feed("abc") == "abc" and f.flush() == ""
