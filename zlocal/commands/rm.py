"""`zlocal rm KEY_OR_MODEL [-y]`: remove a prepared form (by key or a unique prefix of 6+ characters),
a model of zlocal's cache, or a repo of the Hugging Face cache, after confirmation."""

from __future__ import annotations

import shutil

from zlocal.errors import InvalidArgumentError

LOADS_MODELS = False  # cli: no transformers set-up needed


def register(sub) -> None:
    p = sub.add_parser("rm", help="remove a prepared form or a cached model (asks first)")
    p.add_argument(
        "target", metavar="KEY_OR_MODEL", help="a prepared key (from `zlocal list`) or a model name"
    )
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")


def _remove_prepared(key: str, yes: bool) -> int | None:
    from zlocal.checkpoint.prepared_cache import list_prepared, remove_prepared
    from zlocal.commands._confirm import confirm
    from zlocal.commands._models import human_size

    matches = [e for e in list_prepared() if e.key == key or (len(key) >= 6 and e.key.startswith(key))]
    if not matches:
        return None
    if len(matches) > 1:
        remove_prepared(key)  # raises the API's own error naming the ambiguity
    e = matches[0]
    if not confirm(
        f"the prepared {e.format} form {e.key} of {e.model or '?'} ({human_size(e.size_bytes)})", yes
    ):
        return 1
    freed = remove_prepared(e.key)
    print(f"removed {e.key} ({human_size(freed)} freed)")
    return 0


def _with_prepared(what: str, entry) -> str:
    from zlocal.commands._models import human_size

    if not entry.prepared:
        return what
    size = human_size(sum(p["size_bytes"] for p in entry.prepared))
    return f"{what} and its {len(entry.prepared)} prepared form(s) ({size})"


def _remove_model_prepared(entry) -> None:
    from zlocal.checkpoint.prepared_cache import remove_prepared

    for p in entry.prepared:
        remove_prepared(p["key"])


def _remove_hf(entry, yes: bool) -> int:
    from huggingface_hub import scan_cache_dir

    from zlocal.commands._confirm import confirm
    from zlocal.commands._models import human_size

    repo = next(r for r in scan_cache_dir().repos if r.repo_id == entry.name and r.repo_type == "model")
    what = (
        f"{repo.repo_id} from the Hugging Face cache ({repo.repo_path}, {human_size(repo.size_on_disk)}, "
        f"{len(repo.revisions)} revision(s))"
    )
    if not confirm(_with_prepared(what, entry), yes):
        return 1
    # the whole repo folder: delete_revisions() goes by commit hash, which two repos may share
    shutil.rmtree(repo.repo_path)
    _remove_model_prepared(entry)
    print(f"removed {repo.repo_id} ({human_size(repo.size_on_disk)} freed)")
    return 0


def run(args) -> int:
    from zlocal.checkpoint.resolve import ALIASES
    from zlocal.commands._confirm import confirm
    from zlocal.commands._models import all_models, human_size, remove_zlocal_model

    done = _remove_prepared(args.target, args.yes)
    if done is not None:
        return done
    models, _ = all_models()
    names = {args.target, ALIASES.get(args.target.lower(), args.target)}
    found = [
        m for m in models if m.name in names or (m.where == "zlocal" and m.path.endswith("/" + args.target))
    ]
    if not found:
        raise InvalidArgumentError(
            f"no prepared entry or cached model matches {args.target!r}; `zlocal list` shows them"
        )
    entry = found[0]
    if entry.where == "hf-cache":
        return _remove_hf(entry, args.yes)
    what = f"{entry.name} from zlocal's cache ({entry.path}, {human_size(entry.size_bytes)})"
    if not confirm(_with_prepared(what, entry), args.yes):
        return 1
    freed = remove_zlocal_model(entry)
    _remove_model_prepared(entry)
    print(f"removed {entry.name} ({human_size(freed)} freed)")
    return 0
