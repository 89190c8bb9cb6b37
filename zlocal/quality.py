"""How much did quantization change the model: perplexity, KL divergence and top-1 agreement.

The reference model runs first and its log-probabilities are kept (float32, a few hundred MB at
most for the default 1024 tokens); it is freed before the quantized model loads, so the two never
sit in memory together.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, DependencyError, InvalidArgumentError

DEFAULT_MAX_TOKENS = 1024
DEFAULT_WINDOW = 512


@dataclass
class QualityReport:
    """Perplexity of both models on the same tokens, mean KL(ref || model) and top-1 agreement."""

    tokens: int
    window: int
    text: str
    reference_ppl: float
    ppl: float
    ppl_change_pct: float
    kl_mean: float
    top1_agreement: float
    mode: str = "native"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A short human-readable table."""
        rows = [
            ("tokens evaluated", f"{self.tokens} ({self.text}, windows of {self.window})"),
            ("perplexity, reference", f"{self.reference_ppl:.3f}"),
            ("perplexity, converted", f"{self.ppl:.3f} ({self.ppl_change_pct:+.2f}%)"),
            ("mean KL(ref || converted)", f"{self.kl_mean:.5f} nats/token"),
            ("top-1 token agreement", f"{100 * self.top1_agreement:.2f}%"),
            ("kernels", self.mode),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def builtin_text(name: str = "eval.txt") -> str:
    """The English evaluation (or calibration) text shipped in zlocal/data."""
    return resources.files("zlocal").joinpath("data", name).read_text(encoding="utf-8")


def load_text(path: str | os.PathLike | None) -> tuple[str, str]:
    """(text, label) from a file, or the built-in evaluation text."""
    if path is None:
        return builtin_text("eval.txt"), "built-in eval text"
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8"), p.name
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read text file {p}: {exc.__class__.__name__}") from exc


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


def _model_dtype(path: Path) -> torch.dtype:
    import json

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.bfloat16}.get(name, torch.float32)


def evaluate(
    model: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    text: str | os.PathLike | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    quiet: bool = True,
    native: bool = False,
) -> QualityReport:
    """Compare MODEL against REFERENCE on the same tokens (tokenizer of the reference).

    Both are checkpoint directories (or anything ``resolve_model`` accepts). Computation runs on
    CPU in the reference's dtype (float16 checkpoints run in bfloat16 on CPU).

    bitsandbytes models are dequantized after loading unless ``native``: that measures what the
    stored weights lose, which is what zlocal's weight-only CPU kernels compute, and avoids
    bitsandbytes' CPU path (int8 also quantizes activations, and is ~40x slower than bf16).
    """
    from transformers import AutoTokenizer

    from .resolve import resolve_model

    if max_tokens < 2 or window < 2:
        raise InvalidArgumentError("max_tokens and window must be at least 2")
    ref_path = resolve_model(reference).path
    model_path = resolve_model(model).path
    body, label = load_text(text)
    tok = AutoTokenizer.from_pretrained(ref_path)
    ids = tok(body)["input_ids"][:max_tokens]
    windows = _windows(ids, window)
    if not windows:
        raise InvalidArgumentError(f"{label} is too short to evaluate (needs at least 2 tokens)")
    n = sum(w.numel() - 1 for w in windows)
    dtype = _model_dtype(ref_path)

    if not quiet:
        print(f"evaluating reference {ref_path.name} on {n} tokens...", file=sys.stderr)
    ref = _load(ref_path, dtype)
    ref_lp = _logprobs(ref, windows)
    del ref
    gc.collect()
    if not quiet:
        print("evaluating the converted model...", file=sys.stderr)
    qm = _load(model_path, dtype)
    mode = "native"
    if _is_bnb(qm) and not native:
        qm = qm.dequantize()
        mode = "weight-only (bitsandbytes weights dequantized)"
    q_lp = _logprobs(qm, windows)
    del qm
    gc.collect()

    nll_ref = nll_q = kl = agree = 0.0
    for w, r, q in zip(windows, ref_lp, q_lp, strict=True):
        if r.shape[-1] != q.shape[-1]:
            raise CheckpointError(f"vocab sizes differ: reference {r.shape[-1]}, model {q.shape[-1]}")
        target = w[1:]
        nll_ref -= r.gather(-1, target[:, None]).sum().item()
        nll_q -= q.gather(-1, target[:, None]).sum().item()
        kl += (r.exp() * (r - q)).sum().item()
        agree += (r.argmax(-1) == q.argmax(-1)).sum().item()
    ppl_ref, ppl_q = math.exp(nll_ref / n), math.exp(nll_q / n)
    return QualityReport(
        tokens=n,
        window=window,
        text=label,
        reference_ppl=round(ppl_ref, 4),
        ppl=round(ppl_q, 4),
        ppl_change_pct=round(100 * (ppl_q / ppl_ref - 1), 3),
        kl_mean=round(kl / n, 6),
        top1_agreement=round(agree / n, 4),
        mode=mode,
    )
