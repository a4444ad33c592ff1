"""A KV cache for a contiguous range of decoder layers of one sequence.

All layers live in one storage tensor, so the whole cache can be one shared-memory block.
Each layer has its own length: on the edge, positions that exited early are missing from
the layers above their exit until the next position carries them up (see edge/partition.py).
"""

from __future__ import annotations

import torch

from cecollm.errors import CacheFull


class KVCache:
    """Keys and values of layers [first_layer, first_layer + n_layers) for one sequence."""

    def __init__(
        self,
        first_layer: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        storage: torch.Tensor | None = None,
    ) -> None:
        self.first_layer = first_layer
        self.n_layers = n_layers
        # storage: [n_layers, 2 (key, value), n_kv_heads, capacity, head_dim]
        if storage is None:
            storage = torch.empty(n_layers, 2, n_kv_heads, capacity, head_dim, dtype=dtype)
            self._growable = True
        else:
            assert storage.shape[:3] == (n_layers, 2, n_kv_heads) and storage.shape[4] == head_dim, (
                f"storage of shape {tuple(storage.shape)} does not fit {n_layers} layers, "
                f"{n_kv_heads} kv heads of size {head_dim}"
            )
            self._growable = False
        self.storage = storage
        self.lengths = [0] * n_layers

    @classmethod
    def for_runner(cls, runner, first_layer: int, n_layers: int, capacity: int = 256) -> KVCache:
        """A growable cache of the shape and dtype of `runner`'s model (a layers.DecoderRunner)."""
        return cls(first_layer, n_layers, runner.n_kv_heads, runner.head_dim, capacity, runner.embed.weight.dtype)

    @property
    def capacity(self) -> int:
        return self.storage.shape[3]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def length(self, layer: int) -> int:
        """Number of positions held at absolute layer index `layer`."""
        return self.lengths[layer - self.first_layer]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if not self._growable:
            raise CacheFull(f"KV cache holds at most {self.capacity} positions, {needed} needed")
        new_capacity = max(needed, 2 * self.capacity)
        n, two, h, cap, d = self.storage.shape
        grown = torch.empty(n, two, h, new_capacity, d, dtype=self.storage.dtype)
        grown[:, :, :, :cap] = self.storage
        self.storage = grown

    def append(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor):
        """Write key/value [1, n_kv_heads, T, head_dim] at positions [start, start+T) of `layer`.

        Returns the layer's keys and values for positions [0, start+T), each
        [1, n_kv_heads, start+T, head_dim].
        """
        i = layer - self.first_layer
        assert start == self.lengths[i], f"layer {layer}: append at {start}, but it holds {self.lengths[i]}"
        end = start + key.shape[2]
        self._reserve(end)
        self.storage[i, 0, :, start:end] = key[0]
        self.storage[i, 1, :, start:end] = value[0]
        self.lengths[i] = end
        return self.storage[i, 0, :, :end].unsqueeze(0), self.storage[i, 1, :, :end].unsqueeze(0)

    def truncate(self, length: int) -> None:
        """Forget positions >= `length` at every layer (a roll-back: their tokens were wrong)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def read(self, layer: int):
        """Keys and values of `layer`, each [n_kv_heads, length, head_dim]."""
        i = layer - self.first_layer
        n = self.lengths[i]
        return self.storage[i, 0, :, :n], self.storage[i, 1, :, :n]
