"""`zlocal convert SRC OUT --method nf4|fp4|int8|gptq4|gptq8`: quantize into a verified directory."""

from __future__ import annotations

import contextlib
import json
import sys

from zlocal.formats import convert_methods


def add_convert_args(p) -> None:
    """The arguments shared by `zlocal convert` and scripts/convert.py."""
    p.add_argument("src", help="source checkpoint: directory, HF repo id in the local cache, or alias")
    p.add_argument("out", help="output directory, outside SRC (must not exist unless --overwrite)")
    p.add_argument(
        "--method",
        required=True,
        choices=list(convert_methods()),
        help="bitsandbytes nf4/fp4/int8 (streaming, low memory) or GPTQ 4/8-bit (calibrated)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="GPTQ group size: 32, 64 or 128, or -1 per channel "
        "(default: the largest of 128/64/32 dividing every layer, else -1)",
    )
    p.add_argument(
        "--sym",
        action="store_true",
        help="GPTQ: symmetric groups, for GPU Marlin kernels (default: asymmetric, better quality)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="GPTQ calibration text (default: built-in English text)",
    )
    p.add_argument("--samples", type=int, default=None, help="GPTQ calibration samples (default 16)")
    p.add_argument(
        "--seq-len", type=int, default=None, help="GPTQ tokens per calibration sample (default 256)"
    )
    p.add_argument(
        "--tune-epochs",
        type=int,
        default=None,
        metavar="N",
        help="GPTQ: epochs of end-to-end scale tuning after GPTQ (default 8 for gptq4, 0 for gptq8)",
    )
    p.add_argument(
        "--eval-text",
        default=None,
        metavar="FILE",
        help="text for the quality report (default: built-in English text)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the quality report (faster)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier zlocal output or empty (only once done)",
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle .bin weights (read with weights_only=True)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")


def register(sub) -> None:
    p = sub.add_parser("convert", help="quantize a checkpoint (nf4, fp4, int8, gptq4, gptq8)")
    add_convert_args(p)


def run(args) -> int:
    from zlocal.conversion.convert import convert

    # Libraries (gptqmodel) print banners on stdout; with --json stdout must hold only the result.
    with contextlib.redirect_stdout(sys.stderr):
        result = convert(
            args.src,
            args.out,
            args.method,
            group_size=args.group_size,
            calibration=args.calibration,
            samples=args.samples,
            seq_len=args.seq_len,
            sym=args.sym,
            tune_epochs=args.tune_epochs,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            eval_text=args.eval_text,
            evaluate=not args.no_eval,
            quiet=args.quiet or args.json,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    elif not args.quiet:
        print(
            f"wrote {result.out} ({result.method}, {result.output_bytes / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s); check it any time with `zlocal verify {result.out}`",
            file=sys.stderr,
        )
    return 0
