"""How much did quantization change the model: perplexity, KL divergence and top-1 agreement.

The evaluation texts (zlocal/data/eval_*.txt) are four kinds written for this report: literary prose,
a play-script dialogue, license-agreement prose with a technical schedule, and Rust code. None shares
a source or a style with the calibration text GPTQ and scale tuning fit to (plain expository prose,
Q&A and assistant chat turns, simple Python), so the report does not flatter methods that saw it.
Each kind is scored on its own; the headline numbers are their means, so no kind dominates. A user
text (``text=``, ``--eval-text``) is one more kind.

By default the two models are streamed one decoder layer at a time (zlocal/quality_stream.py), so
the report needs about one layer of memory, not the bf16 reference. Where that is not possible
(another architecture, pickle weights, another quantization format) the whole models are loaded one
after the other, or, above WHOLE_MODEL_MAX_BYTES of reference weights, the report is skipped; either
way the report and stderr say so.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from zlocal.errors import CheckpointError, DependencyError, InvalidArgumentError

DEFAULT_MAX_TOKENS = 1024  # per kind
DEFAULT_WINDOW = 512
# Built-in kinds: (label, file in zlocal/data).
KINDS = (
    ("prose", "eval_prose.txt"),
    ("dialogue", "eval_dialogue.txt"),
    ("technical/legal", "eval_legal.txt"),
    ("code", "eval_code.txt"),
)
# Fallback without streaming: whole models are loaded only when the reference's weights are this
# small, which keeps the report inside the converter's < 3 GB promise.
WHOLE_MODEL_MAX_BYTES = 1 << 30


@dataclass
class KindScore:
    """One evaluation text's numbers."""

    kind: str
    tokens: int
    reference_ppl: float
    ppl: float
    ppl_change_pct: float
    kl_mean: float
    top1_agreement: float


@dataclass
class QualityReport:
    """Per-kind scores and their means: perplexity (geometric mean over kinds, change from the ratio
    of those means), KL(ref || model) and top-1 agreement (arithmetic means of the kinds' per-token
    means). ``path`` says how the models ran; ``note`` why the streamed path was not used. A skipped
    report has no numbers (None)."""

    tokens: int
    window: int
    text: str
    reference_ppl: float | None
    ppl: float | None
    ppl_change_pct: float | None
    kl_mean: float | None
    top1_agreement: float | None
    mode: str = "native"
    path: str = "streamed layer by layer"
    note: str | None = None
    kinds: list[KindScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A short human-readable table: one row per kind and their mean."""
        if self.ppl is None:
            return f"quality report skipped: {self.note}"
        head = (
            f"{'kind':<16} {'tokens':>6} {'ppl ref':>9} {'ppl conv':>9} {'change':>8} {'KL':>8} {'top-1':>7}"
        )
        mean = KindScore(
            "mean", self.tokens, self.reference_ppl, self.ppl, self.ppl_change_pct, self.kl_mean,
            self.top1_agreement,
        )  # fmt: skip
        rows = [head]
        for k in [*self.kinds, mean]:
            rows.append(
                f"{k.kind[:16]:<16} {k.tokens:>6} {k.reference_ppl:>9.3f} {k.ppl:>9.3f} "
                f"{k.ppl_change_pct:>+7.2f}% {k.kl_mean:>8.5f} {100 * k.top1_agreement:>6.2f}%"
            )
        rows.append(
            f"windows of {self.window} tokens; KL(ref || converted) in nats/token; kernels: {self.mode}"
        )
        rows.append(f"ran: {self.path}" + (f" ({self.note})" if self.note else ""))
        return "\n".join(rows)


def builtin_text(name: str) -> str:
    """A text shipped in zlocal/data (evaluation kinds, calibration)."""
    return resources.files("zlocal").joinpath("data", name).read_text(encoding="utf-8")


def _strip_header(text: str) -> str:
    # the built-in texts open with "##" lines saying what they are and where they come from
    lines = text.split("\n")
    while lines and lines[0].startswith("##"):
        lines.pop(0)
    return "\n".join(lines).lstrip("\n")


def eval_texts(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(kind, text) for each built-in kind, plus the file at PATH (labelled with its name)."""
    texts = [(kind, _strip_header(builtin_text(name))) for kind, name in KINDS]
    if path is not None:
        p = Path(path)
        try:
            texts.append((p.name, p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"cannot read text file {p}: {exc.__class__.__name__}") from exc
    return texts


def _load(path: Path, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": "cpu", "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:
        raise DependencyError(f"loading {path.name} needs an optional package: {exc}") from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path.name}: cannot load for evaluation: {exc.__class__.__name__}: {first}"
        ) from exc
    model.eval()
    return model


def _is_bnb(model) -> bool:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _windows(ids: list[int], window: int) -> list[torch.Tensor]:
    out = [torch.tensor(ids[i : i + window]) for i in range(0, len(ids), window)]
    return [w for w in out if w.numel() >= 2]


@torch.inference_mode()
def _logprobs(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for w in windows:
        with warnings.catch_warnings():
            # bitsandbytes warns on every int8 matmul that it casts bf16 inputs to fp16
            warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
            logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, dim=-1))
        del logits
    return out


def whole_model_logprobs(model_path: Path, ref_path: Path, windows, dtype, *, native: bool, quiet: bool):
    """([(reference, model) log-probabilities per window], kernel mode): each model loaded whole,
    one after the other; the reference's log-probabilities are kept while the model runs."""
    if not quiet:
        print(f"evaluating reference {ref_path.name} (whole model)...", file=sys.stderr)
    ref = _load(ref_path, dtype)
    ref_lp = _logprobs(ref, windows)
    del ref
    gc.collect()
    if not quiet:
        print("evaluating the converted model (whole model)...", file=sys.stderr)
    qm = _load(model_path, dtype)
    mode = "native"
    if _is_bnb(qm) and not native:
        qm = qm.dequantize()
        mode = "weight-only (bitsandbytes weights dequantized)"
    q_lp = _logprobs(qm, windows)
    del qm
    gc.collect()
    return list(zip(ref_lp, q_lp, strict=True)), mode


def _model_dtype(path: Path) -> torch.dtype:
    import json

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.bfloat16}.get(name, torch.float32)


def _weight_bytes(path: Path) -> int:
    return sum(
        p.stat().st_size for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"}
    )


def _score(kind: str, window_ids, pairs) -> KindScore:
    """One kind's perplexities, mean KL(ref || model) and top-1 agreement over its windows."""
    n = 0
    nll_ref = nll_q = kl = agree = 0.0
    for w, (r, q) in zip(window_ids, pairs, strict=True):
        if r.shape[-1] != q.shape[-1]:
            raise CheckpointError(f"vocab sizes differ: reference {r.shape[-1]}, model {q.shape[-1]}")
        target = w[1:, None]
        n += target.shape[0]
        nll_ref -= r.gather(-1, target).sum().item()
        nll_q -= q.gather(-1, target).sum().item()
        agree += (r.argmax(-1) == q.argmax(-1)).sum().item()
        # KL(ref || model) = sum p_ref (log p_ref - log p_model), in row chunks so the temporaries
        # stay small next to a 7B's two output heads
        for s in range(0, r.shape[0], 128):
            rs = r[s : s + 128]
            kl += (rs.exp() * (rs - q[s : s + 128])).sum().item()
        del r, q, rs  # before the next window's pair is computed
    ppl_ref, ppl_q = math.exp(nll_ref / n), math.exp(nll_q / n)
    return KindScore(
        kind=kind,
        tokens=n,
        reference_ppl=round(ppl_ref, 4),
        ppl=round(ppl_q, 4),
        ppl_change_pct=round(100 * (ppl_q / ppl_ref - 1), 3),
        kl_mean=round(kl / n, 6),
        top1_agreement=round(agree / n, 4),
    )


def _summary(kinds: list[KindScore], **fields) -> QualityReport:
    k = len(kinds)
    geo_ref = math.exp(sum(math.log(s.reference_ppl) for s in kinds) / k)
    geo_q = math.exp(sum(math.log(s.ppl) for s in kinds) / k)
    return QualityReport(
        tokens=sum(s.tokens for s in kinds),
        reference_ppl=round(geo_ref, 4),
        ppl=round(geo_q, 4),
        ppl_change_pct=round(100 * (geo_q / geo_ref - 1), 3),
        kl_mean=round(sum(s.kl_mean for s in kinds) / k, 6),
        top1_agreement=round(sum(s.top1_agreement for s in kinds) / k, 4),
        kinds=kinds,
        **fields,
    )


def _choose_path(
    model_path: Path, ref_path: Path, stream: bool | None, native: bool
) -> tuple[str, str | None]:
    """('stream' | 'whole' | 'skip', note)."""
    from zlocal.conversion.quality_stream import why_not_streamable

    if native or stream is False:
        return "whole", None  # asked for: bitsandbytes' own kernels need the loaded model
    reason = why_not_streamable(model_path, ref_path)
    if reason is None:
        return "stream", None
    if stream:
        raise InvalidArgumentError(f"cannot stream the quality report: {reason}")
    size = _weight_bytes(ref_path)
    if size <= WHOLE_MODEL_MAX_BYTES:
        return "whole", f"not streamed: {reason}; whole models loaded ({size / 2**30:.2f} GiB reference)"
    return "skip", (
        f"not streamed: {reason}, and loading the {size / 2**30:.1f} GiB reference whole would break "
        "the converter's memory bound; run `zlocal eval` where the RAM allows"
    )


def evaluate(
    model: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    text: str | os.PathLike | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    quiet: bool = True,
    native: bool = False,
    stream: bool | None = None,
    allow_pickle: bool = False,
) -> QualityReport:
    """Compare MODEL against REFERENCE on the built-in kinds of text plus TEXT (a file), each cut to
    MAX_TOKENS tokens of the reference's tokenizer and run in windows of WINDOW tokens.

    Both are checkpoint directories (or anything ``resolve_model`` accepts). Computation runs on
    CPU in the reference's dtype (float16 checkpoints run in bfloat16 on CPU). ``stream`` None
    streams both models layer by layer where possible (see the module doc), True insists on it,
    False loads each model whole (the previous path).

    bitsandbytes and GPTQ weights are dequantized: that measures what the stored weights lose, which
    is what zlocal's weight-only CPU kernels compute, and avoids bitsandbytes' CPU path (int8 also
    quantizes activations, and is ~40x slower than bf16). ``native`` runs bitsandbytes' (or
    gptqmodel's) own kernels on the whole loaded model instead. ``allow_pickle`` accepts a
    reference with pickle weights (opened with ``weights_only=True``), as ``zlocal convert`` did.
    """
    from transformers import AutoTokenizer

    from zlocal.checkpoint.resolve import resolve_model

    if max_tokens < 2 or window < 2:
        raise InvalidArgumentError("max_tokens and window must be at least 2")
    ref_path = resolve_model(reference, allow_pickle=allow_pickle).path
    model_path = resolve_model(model).path
    tok = AutoTokenizer.from_pretrained(ref_path)
    windows, owner, labels = [], [], []
    for kind, body in eval_texts(text):
        ws = _windows(tok(body)["input_ids"][:max_tokens], window)
        if not ws:
            raise InvalidArgumentError(f"{kind} is too short to evaluate (needs at least 2 tokens)")
        labels.append(kind)
        windows += ws
        owner += [len(labels) - 1] * len(ws)
    dtype = _model_dtype(ref_path)
    how, note = _choose_path(model_path, ref_path, stream, native)
    fields = {"window": window, "text": " + ".join(labels), "note": note}
    if note:
        print(f"quality report: {note}", file=sys.stderr)
    if how == "skip":
        return QualityReport(0, reference_ppl=None, ppl=None, ppl_change_pct=None, kl_mean=None,
                             top1_agreement=None, mode="none", path="skipped", **fields)  # fmt: skip
    if how == "stream":
        from zlocal.conversion.quality_stream import stream_logprobs

        pairs, mode = stream_logprobs(model_path, ref_path, windows, dtype, quiet=quiet)
        path = "streamed layer by layer"
    else:
        pairs, mode = whole_model_logprobs(model_path, ref_path, windows, dtype, native=native, quiet=quiet)
        path = "whole models, one after the other"
    # the pairs arrive window by window, in order; each kind takes its own windows' pairs
    pairs = iter(pairs)
    kinds = []
    for i, kind in enumerate(labels):
        mine = [w for w, o in zip(windows, owner, strict=True) if o == i]
        kinds.append(_score(kind, mine, (next(pairs) for _ in mine)))
    return _summary(kinds, mode=mode, path=path, **fields)
