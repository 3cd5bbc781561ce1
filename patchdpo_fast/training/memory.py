"""Memory accounting: count the bytes that tensors hold, on any device, including the ``meta`` device.

:class:`AllocationTracker` watches every tensor operation (a ``TorchDispatchMode``) and records the storages that
the operations create, with their sizes, for as long as they stay alive. It measures what a piece of code allocates
and still holds afterwards (e.g. the activations a forward pass keeps for the backward pass) and its peak, and it
works the same on the ``meta`` device, where tensors have shapes and dtypes but no memory: so the figures of an
SDXL-size model come from running it on ``meta``, without weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AllocationTracker", "tensor_bytes"]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by the distinct storages of ``tensors`` (views and repeated tensors count once).

    Non-tensor items are ignored, so ``tensor_bytes(module.parameters())`` or
    ``tensor_bytes(pytree.tree_leaves(optimizer.state))`` work as they are.
    """
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class AllocationTracker(TorchDispatchMode):
    """Track the tensor storages that operations allocate while this mode is active.

    A storage counts from the operation that creates it (an output sharing no storage with the operation's inputs:
    views and in-place results are not allocations) until it is freed, whoever holds it (autograd's saved tensors
    included). Use as a context manager::

        with AllocationTracker() as tracker:
            out = model(x)
        tracker.live_bytes()   # what the forward still holds: activations saved for backward + the output
        tracker.peak_bytes     # the most it held at once

    Attributes:
        peak_bytes: the largest :meth:`live_bytes` seen right after an allocation.
        allocated_bytes: the sum of all allocations (freed or not).
        allocations: number of storages allocated.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live_sum = 0
        self.peak_bytes = 0
        self.allocated_bytes = 0
        self.allocations = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        grew = False
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs:
                continue
            known = self._live.get(key)
            if known is not None and not known[0].expired():
                continue
            if known is not None:  # the address of a freed storage was reused
                self._live_sum -= known[1]
            nbytes = storage.nbytes()
            self._live[key] = (StorageWeakRef(storage), nbytes)
            self._live_sum += nbytes
            self.allocated_bytes += nbytes
            self.allocations += 1
            grew = True
        if grew:
            self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        """Bytes of the storages allocated under this tracker that are still alive now."""
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self._live_sum -= self._live.pop(key)[1]
        return self._live_sum
