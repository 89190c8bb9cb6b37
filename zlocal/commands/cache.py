"""`zlocal cache clear [-y]`: delete every prepared form in zlocal's cache (models stay)."""

from __future__ import annotations

LOADS_MODELS = False  # cli: no transformers set-up needed


def register(sub) -> None:
    p = sub.add_parser("cache", help="manage zlocal's cache of prepared forms: `zlocal cache clear`")
    p.add_argument("action", metavar="ACTION", choices=["clear"], help="clear: delete every prepared form")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")


def run(args) -> int:
    from zlocal.checkpoint.prepared_cache import clear_prepared, list_prepared, prepared_dir
    from zlocal.commands._confirm import confirm
    from zlocal.commands._models import human_size

    entries = list_prepared()
    total = sum(e.size_bytes for e in entries)
    if not entries and not any(prepared_dir().glob(".tmp-*")):
        print("the prepared cache is empty")
        return 0
    if not confirm(
        f"all {len(entries)} prepared form(s) in {prepared_dir()} ({human_size(total)})", args.yes
    ):
        return 1
    freed = clear_prepared()
    print(f"cleared the prepared cache ({human_size(freed)} freed)")
    return 0
