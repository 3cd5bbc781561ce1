"""Pickle-free serialization of nested training state (optimizer, scheduler, RNG) as safetensors + JSON.

A nested structure of dicts, lists, tuples, tensors and JSON scalars is split into

* a flat ``{name: tensor}`` dict written with safetensors, and
* a JSON skeleton in which every tensor is replaced by ``{"__tensor__": name}`` (tuples, non-string dict keys,
  ``torch.dtype`` values and non-finite floats are tagged so they round-trip exactly).

Anything else (an arbitrary Python object) raises ``TypeError`` instead of being pickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from patchdpo_fast.utils import atomic_write_bytes, atomic_write_json, write_safetensors

__all__ = ["atomic_write_bytes", "atomic_write_json", "flatten_state", "load_state", "save_state", "unflatten_state"]


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-serializable skeleton and a flat dict of tensors (detached, not copied)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = path
            # no copy here: save_state writes each tensor from where it is (write_safetensors)
            tensors[name] = value.detach()
            return {"__tensor__": name}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {"__dict__": {k: walk(v, f"{path}.{k}") for k, v in value.items()}}
            items = []
            for i, (k, v) in enumerate(value.items()):
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"cannot serialize dict key of type {type(k).__name__} at {path}")
                items.append([k, walk(v, f"{path}.{i}")])
            return {"__items__": items}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot serialize {type(value).__name__} at {path} without pickle")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"].items()}
        if "__items__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dtype__" in skeleton:
            return getattr(torch, skeleton["__dtype__"])
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
        raise ValueError(f"unknown state skeleton entry: {sorted(skeleton)}")
    return skeleton


def save_state(obj: Any, path_stem: str | os.PathLike) -> None:
    """Write ``obj`` to ``<stem>.safetensors`` and ``<stem>.json`` (each atomically).

    Tensors are written one at a time straight from their memory (see
    :func:`~patchdpo_fast.utils.write_safetensors`): a save holds no second copy of the state; a tensor on an
    accelerator is brought to the host one tensor at a time.
    """
    stem = Path(path_stem)
    skeleton, tensors = flatten_state(obj)
    write_safetensors(tensors, stem.with_suffix(".safetensors"))
    atomic_write_json(stem.with_suffix(".json"), skeleton)


def load_state(path_stem: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read what :func:`save_state` wrote."""
    stem = Path(path_stem)
    for suffix in (".json", ".safetensors"):
        if not stem.with_suffix(suffix).is_file():
            raise FileNotFoundError(f"checkpoint file missing: {stem.with_suffix(suffix)}")
    skeleton = json.loads(stem.with_suffix(".json").read_text())
    tensors = load_file(str(stem.with_suffix(".safetensors")), device=str(device))
    return unflatten_state(skeleton, tensors)
