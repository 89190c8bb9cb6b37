"""A preallocated KV cache that plugs into transformers' ``Cache`` interface.

Each layer owns one buffer of ``max_tokens`` positions, allocated on first use on the layer's own
device (so accelerate's GPU/CPU split just works) and written in place. Attention only ever sees
the filled prefix, so short prompts do not pay for the full context. Rolling back to a shorter
prefix (multi-turn prefix reuse) only moves the length pointer. Sliding-window models keep every
position and let the mask enforce the window, which keeps rollback exact.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from zlocal.errors import ContextOverflowError


class PreallocatedLayer(CacheLayerMixin):
    """One decoder layer's keys and values in a fixed buffer of ``max_tokens`` positions."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self.device = key_states.device
        self.keys = torch.empty((b, h, self.max_tokens, dk), dtype=key_states.dtype, device=self.device)
        self.values = torch.empty(
            (b, h, self.max_tokens, value_states.shape[-1]), dtype=value_states.dtype, device=self.device
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_tokens:
            raise ContextOverflowError(f"KV cache full: {end} tokens do not fit in {self.max_tokens}")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_tokens

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' convention: a negative count of tokens to drop from the end
        self.length = max(0, self.length - abs(tokens_to_remove))

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class KVCache(Cache):
    """A transformers ``Cache`` made of preallocated layers, plus a rollback to any prefix length."""

    def __init__(self, num_layers: int, max_tokens: int):
        super().__init__(layers=[PreallocatedLayer(max_tokens) for _ in range(num_layers)])
        self.max_tokens = max_tokens

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (what the next forward will build on)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)

    def nbytes(self) -> int:
        """Bytes held by the allocated buffers."""
        return sum(layer.nbytes() for layer in self.layers)
