"""What `zlocal convert --overwrite` may delete: only an earlier zlocal output (or an empty dir).

Each refusal is checked to leave the source and any unrelated files byte for byte as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zlocal.checkpoint.manifest import MANIFEST_NAME, sha256_file, verify
from zlocal.conversion.convert import TMP_MARK, convert
from zlocal.errors import ConversionError


def _snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (links as their target) by relative path -> sha256."""
    return {
        str(p.relative_to(root)): (f"-> {p.readlink()}" if p.is_symlink() else sha256_file(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def _src(tiny_zephyr, dest: Path) -> Path:
    shutil.copytree(tiny_zephyr, dest, ignore=shutil.ignore_patterns(".complete"))
    return dest


def _convert(src, out, **kw):
    return convert(src, out, "int8", evaluate=False, quiet=True, **kw)


def test_out_that_contains_src_is_refused(tiny_zephyr, tmp_path):
    """The issue's case: OUT an ancestor of SRC used to be wiped with the source in it."""
    root = tmp_path / "models"
    src = _src(tiny_zephyr, root / "zephyr")
    (root / "notes.txt").write_text("mine")
    before = _snapshot(root)
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match="contains SRC"):
            _convert(src, root, overwrite=overwrite)
    assert _snapshot(root) == before


def test_out_that_is_src_is_refused(tiny_zephyr, tmp_path):
    src = _src(tiny_zephyr, tmp_path / "src")
    before = _snapshot(src)
    with pytest.raises(ConversionError, match="is SRC itself"):
        _convert(src, src, overwrite=True)
    assert _snapshot(src) == before


def test_symlinks_are_resolved(tiny_zephyr, tmp_path):
    """A link to SRC, or to a folder holding SRC, is SRC for these checks."""
    root = tmp_path / "models"
    src = _src(tiny_zephyr, root / "zephyr")
    (tmp_path / "to-src").symlink_to(src)
    (tmp_path / "to-root").symlink_to(root)
    before = _snapshot(root)
    with pytest.raises(ConversionError, match="is SRC itself"):
        _convert(src, tmp_path / "to-src", overwrite=True)
    with pytest.raises(ConversionError, match="contains SRC"):
        _convert(src, tmp_path / "to-root", overwrite=True)
    # and SRC named through a link into OUT
    with pytest.raises(ConversionError, match="contains SRC"):
        _convert(tmp_path / "to-root" / "zephyr", root, overwrite=True)
    assert _snapshot(root) == before


def test_non_empty_out_without_manifest_is_refused(tiny_zephyr, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "sub" / "data.csv").write_text("1,2")
    before = _snapshot(out)
    with pytest.raises(
        ConversionError, match=r"no zlocal\.json.*--overwrite replaces only an earlier zlocal output"
    ):
        _convert(tiny_zephyr, out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left either


def test_earlier_output_with_unlisted_files_is_refused(tiny_zephyr, tmp_path):
    """A file or folder the manifest does not list was put there by someone else."""
    out = tmp_path / "out"
    _convert(tiny_zephyr, out)
    for extra in ("notes.txt", "runs/log.txt"):
        target = out / extra
        target.parent.mkdir(exist_ok=True)
        target.write_text("mine")
        before = _snapshot(out)
        with pytest.raises(
            ConversionError, match=rf"holds {extra.split('/')[0]}, which its zlocal\.json does not list"
        ):
            _convert(tiny_zephyr, out, overwrite=True)
        assert _snapshot(out) == before
        shutil.rmtree(out / "runs", ignore_errors=True)
        target.unlink(missing_ok=True)


def test_unreadable_manifest_is_refused(tiny_zephyr, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("not json")
    (out / "model.safetensors").write_bytes(b"someone else's")
    before = _snapshot(out)
    with pytest.raises(ConversionError, match=r"zlocal\.json is unreadable"):
        _convert(tiny_zephyr, out, overwrite=True)
    assert _snapshot(out) == before


def test_earlier_output_and_empty_dir_are_replaced(tiny_zephyr, tmp_path):
    out = tmp_path / "out"
    _convert(tiny_zephyr, out)
    r = convert(tiny_zephyr, out, "nf4", evaluate=False, quiet=True, overwrite=True)
    assert verify(out).ok and r.method == "nf4" and '"method": "nf4"' in (out / MANIFEST_NAME).read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    _convert(tiny_zephyr, empty, overwrite=True)
    assert verify(empty).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_out_holding_files_src_links_to_is_refused(tiny_zephyr, tmp_path):
    """SRC's tokenizer linked to an earlier output's copy: replacing that output would leave SRC
    with a dangling link."""
    out = tmp_path / "out"
    _convert(tiny_zephyr, out)
    src = _src(tiny_zephyr, tmp_path / "src")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(out / "tokenizer.json")
    before = _snapshot(out)
    with pytest.raises(ConversionError, match=r"which SRC's tokenizer\.json links to"):
        _convert(src, out, overwrite=True)
    assert _snapshot(out) == before and (src / "tokenizer.json").is_file()


def test_stale_temp_cleanup_never_removes_src(tiny_zephyr, tmp_path):
    """A source whose name looks like one of our temp dirs beside OUT is not swept as stale."""
    src = _src(tiny_zephyr, tmp_path / f".out{TMP_MARK}src")
    before = _snapshot(src)
    _convert(src, tmp_path / "out")
    assert _snapshot(src) == before and verify(tmp_path / "out").ok


def test_cli_refusal_is_one_line_and_deletes_nothing(tiny_zephyr, tmp_path, capsys):
    from zlocal.cli import main

    root = tmp_path / "models"
    src = _src(tiny_zephyr, root / "zephyr")
    before = _snapshot(root)
    rc = main(["convert", str(src), str(root), "--method", "nf4", "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert rc == ConversionError.exit_code != 0
    assert err.startswith("zlocal: error:") and err.count("\n") == 1 and "contains SRC" in err
    assert _snapshot(root) == before
