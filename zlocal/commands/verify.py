"""`zlocal verify OUT [--json]`: re-hash a converted checkpoint against its zlocal.json."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("verify", help="re-hash a converted checkpoint against its manifest")
    p.add_argument("out", help="directory written by `zlocal convert`")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from zlocal.checkpoint.manifest import verify

    report = verify(args.out)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if report.ok else 8
