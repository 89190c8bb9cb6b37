"""Where ``zlocal convert`` writes, and what ``--overwrite`` may delete.

A conversion writes into a temporary directory beside OUT and renames it into place only when it is
complete. ``--overwrite`` deletes the old OUT after that rename, so everything that could lose data
is decided here, before any work: OUT must not be SRC, inside SRC or around SRC (compared with
symlinks resolved), and an existing OUT is replaced only when it is empty or an earlier zlocal
output, i.e. holds a readable ``zlocal.json`` and nothing that manifest does not list.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from zlocal.checkpoint.checkpoint_io import ST_ITEMSIZE, TensorEntry
from zlocal.checkpoint.manifest import MANIFEST_NAME, read_manifest
from zlocal.conversion.quantize_bnb import estimate_output_bytes
from zlocal.errors import ConversionError, VerificationError

TMP_MARK = ".zlocal-tmp-"


def _within(path: Path, root: Path) -> bool:
    """True when ``path`` is ``root`` or lies below it (both already resolved)."""
    return path == root or root in path.parents


def check_output(src: Path, out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse every OUT whose conversion could harm SRC or files zlocal did not write; return OUT
    with symlinks resolved (the temp dir goes beside the real directory, so the final rename
    replaces it rather than a link to it)."""
    given = Path(out).expanduser().absolute()
    real_out, real_src = given.resolve(), Path(src).resolve()
    if real_out == real_src:
        raise ConversionError(f"OUT {given} is SRC itself; choose a directory outside the source checkpoint")
    if _within(real_out, real_src):
        raise ConversionError(f"OUT {given} is inside SRC; choose a directory outside the source checkpoint")
    if _within(real_src, real_out):
        raise ConversionError(
            f"OUT {given} contains SRC {real_src}; writing or replacing it would delete the source: "
            "choose a directory outside it"
        )
    # A cached HF snapshot's files are links into a blobs folder: OUT must not hold those either.
    for p in sorted(real_src.iterdir()):
        if _within(p.resolve(), real_out):
            raise ConversionError(
                f"OUT {given} holds {p.resolve()}, which SRC's {p.name} links to; choose another OUT"
            )
    if given.exists():  # a dangling link is no data: the conversion creates its target
        if not overwrite:
            raise ConversionError(
                f"{given} already exists; pass --overwrite to replace it or choose another OUT"
            )
        if not real_out.is_dir():
            raise ConversionError(f"{given} is a file; OUT must be a directory path")
        check_replaceable(real_out)
    if not real_out.parent.is_dir():
        raise ConversionError(f"parent directory {real_out.parent} does not exist; create it first")
    return real_out


def check_replaceable(out: Path) -> None:
    """Refuse to replace a directory that is not empty and not wholly an earlier zlocal output."""
    entries = sorted(out.iterdir())
    if not entries:
        return
    what = "--overwrite replaces only an earlier zlocal output; move those files or choose another OUT"
    if not (out / MANIFEST_NAME).is_file():
        raise ConversionError(
            f"{out} is not empty and has no {MANIFEST_NAME}, so zlocal did not write it; {what}"
        )
    try:
        listed = set(read_manifest(out).files)
    except VerificationError as exc:
        raise ConversionError(f"{out}: its {MANIFEST_NAME} is unreadable; {what}") from exc
    # zlocal writes only regular files; a folder or link inside OUT was put there by someone else
    foreign = [
        p.name
        for p in entries
        if p.name != MANIFEST_NAME and (p.name not in listed or p.is_symlink() or not p.is_file())
    ]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ConversionError(
            f"{out} holds {foreign[0]}{more}, which its {MANIFEST_NAME} does not list; {what}"
        )


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding ``path`` (a function so tests can stand in a full disk)."""
    return shutil.disk_usage(path).free


def check_disk(flat, shards: list[Path], bits: int, method: str, weights_format: str, where: Path) -> int:
    """Refuse when the output (plus staging) will not fit in ``where``; return SRC's weight bytes.

    ``flat``: {tensor name: (shard, safetensors dtype, shape)} of the whole source.
    """
    source_bytes = sum(p.stat().st_size for p in shards)
    entries = [TensorEntry(n, d, s, 0, math.prod(s) * ST_ITEMSIZE.get(d, 4)) for n, (_, d, s) in flat.items()]
    need = estimate_output_bytes(entries, "int8" if bits == 8 else "nf4")
    if weights_format == "pickle" or method.startswith("gptq"):
        # a staged safetensors copy of pickle weights; gptqmodel offloads layers to disk as it goes
        need += source_bytes
    need = int(need * 1.05) + (64 << 20)
    have = free_bytes(where)
    if have < need:
        raise ConversionError(
            f"not enough disk space in {where}: need about {need / 1e9:.2f} GB, "
            f"{have / 1e9:.2f} GB free; free some space or choose another OUT"
        )
    return source_bytes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(out: Path, protect: Path | None = None) -> list[Path]:
    """Remove temp dirs left beside OUT by conversions whose process is gone; return them.

    ``protect`` (SRC) is never removed, nor any directory holding it, even when its name looks
    like one of ours.
    """
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    keep = protect.resolve() if protect is not None else None
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        if keep is not None and _within(keep, p.resolve()):
            continue
        try:
            pid = int((p / ".pid").read_text().strip())
        except (OSError, ValueError):
            pid = -1
        if pid > 0 and _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def install(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to OUT; an old OUT (with --overwrite) is removed only afterwards."""
    # mkdtemp and some writers create private (0700/0600) entries; give OUT the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for p in tmp.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)
    if out.exists():
        old = out.parent / f".{out.name}{TMP_MARK}old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
