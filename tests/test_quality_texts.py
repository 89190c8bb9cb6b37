"""The built-in evaluation texts: several kinds, each its own, none drawn from the calibration text."""

from __future__ import annotations

import re

from zlocal.conversion.quality import KINDS, builtin_text, eval_texts


def _shingles(text: str, n: int = 6) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_kinds_and_sizes(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    texts = eval_texts()
    assert [k for k, _ in texts] == ["prose", "dialogue", "technical/legal", "code"]
    for kind, body in texts:
        assert 500 <= len(tok(body)["input_ids"]) <= 1024, kind
        assert not body.startswith("##") and "zlocal evaluation text" not in body  # header stripped


def test_no_shared_source_with_calibration():
    """No run of 6 words appears both in an evaluation text and in the calibration text GPTQ and
    scale tuning fit to, nor in two evaluation texts."""
    calibration = _shingles(builtin_text("calibration.txt"))
    seen: dict[str, set] = {}
    for kind, body in eval_texts():
        mine = _shingles(body)
        assert len(mine) > 300, kind
        shared = mine & calibration
        assert not shared, f"{kind} shares {sorted(shared)[:3]} with calibration.txt"
        for other, theirs in seen.items():
            assert not mine & theirs, f"{kind} and {other} share text"
        seen[kind] = mine


def test_headers_say_where_the_text_comes_from():
    for kind, name in KINDS:
        header = [line for line in builtin_text(name).splitlines() if line.startswith("##")]
        assert f'kind "{kind}"' in header[0] and any("Written for zlocal" in h for h in header), name


def test_user_text_is_one_more_kind(tmp_path):
    (tmp_path / "mine.txt").write_text("## kept: a user's text is evaluated as it is\nhello")
    texts = eval_texts(tmp_path / "mine.txt")
    assert len(texts) == len(KINDS) + 1 and texts[-1] == (
        "mine.txt",
        "## kept: a user's text is evaluated as it is\nhello",
    )
