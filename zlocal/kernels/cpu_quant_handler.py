"""Quantizing a loaded model's CPU Linear layers in place (gpt-fast's two-phase handler).

The streaming loader quantizes as tensors arrive (zlocal.inference.loader_stream); this handler serves models
that were loaded whole first (pickle checkpoints), and counts the bytes of quantized modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zlocal.kernels.cpu_quant import can_quantize, empty_quant_linear, quantize_linear, quantized_tensors


def decoder_linear_filter(name: str, module: nn.Module) -> bool:
    """Default target: Linear layers inside decoder blocks (embeddings and lm_head stay dense)."""
    return isinstance(module, nn.Linear) and ".layers." in f".{name}"


@dataclass
class WeightOnlyQuantHandler:
    """gpt-fast style two-phase quantizer for the CPU-resident Linear layers of a model.

    ``quantize()`` returns the quantized state dict of the targeted layers without touching the
    model; ``convert()`` swaps those layers for empty quantized modules; ``apply()`` does both and
    loads the state with ``assign=True`` so no second copy of the weights is made.
    """

    model: nn.Module
    bits: int
    dtype: torch.dtype = torch.bfloat16
    group_size: int = 128
    target: Callable[[str, nn.Module], bool] = decoder_linear_filter

    def targets(self) -> dict[str, nn.Linear]:
        """Linear layers that will be quantized (those the kernel accepts and on the CPU)."""
        return {
            name: m
            for name, m in self.model.named_modules()
            if self.target(name, m)
            and m.weight.device.type == "cpu"
            and can_quantize(tuple(m.weight.shape), self.bits, self.group_size)
        }

    def quantize(self) -> dict[str, torch.Tensor]:
        """Phase one: quantized tensors keyed like the converted model's state dict."""
        state = {}
        for name, m in self.targets().items():
            for key, value in quantized_tensors(m.weight, self.bits, self.dtype, self.group_size).items():
                state[f"{name}.{key}"] = value
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().to(self.dtype)
        return state

    def convert(self, names: list[str] | None = None) -> list[str]:
        """Phase two: replace the targeted Linear modules with empty quantized ones."""
        targets = self.targets()
        names = list(targets) if names is None else names
        for name in names:
            m = targets[name]
            new = empty_quant_linear(
                m.in_features,
                m.out_features,
                m.bias is not None,
                bits=self.bits,
                dtype=self.dtype,
                group_size=self.group_size,
            )
            _set_module(self.model, name, new)
        return names

    def apply(self) -> int:
        """Quantize and swap every target, one layer at a time; returns how many were swapped."""
        targets = self.targets()
        for name, m in targets.items():
            _set_module(
                self.model, name, quantize_linear(m.weight, m.bias, self.bits, self.dtype, self.group_size)
            )
        return len(targets)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of parameters plus buffers (what the model keeps resident)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())
