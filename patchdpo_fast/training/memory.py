"""Per-GPU memory of a PatchDPO training run, for every ``model.trainable`` mode, world size and DeepSpeed ZeRO stage.

``patchdpo estimate-memory --config CFG [--world-size N] [--zero-stage S] [--offload optimizer|param|none]
[--architecture sdxl|sd15]`` (also ``python -m patchdpo_fast.training.memory``) prints, per GPU, the weights
(trainable and frozen, by dtype), the gradients, the optimizer (master weights, AdamW or 8-bit AdamW states), the DPO
reference, the EMA copy, the activations of one step and the total, and what CPU offload moves to host memory. From
Python::

    from patchdpo_fast.config import load_config
    from patchdpo_fast.training.memory import estimate_memory

    plan = estimate_memory(load_config("configs/sdxl_ipadapter_plus.yaml", ["model.trainable=unet"],
                                       check_paths=False), world_size=8, zero_stage=3)
    plan.total_bytes, plan.weights_bytes, plan.optimizer_bytes, plan.host_bytes

The formula (every term with its bytes per parameter) is in ``docs/memory.md``. How the figures are made:

* The configured models are built on PyTorch's ``meta`` device (shapes and dtypes, no weights, no memory) in the
  configured mode (the LoRA put on, the UNet in fp32 when it trains in full), and their parameters are counted
  tensor by tensor (:class:`TensorCensus`). The base model is the configured architecture
  (:func:`resolve_architecture`): the tiny one, the ``config.json`` files of ``model.pretrained_path``, or the
  built-in SDXL / SD1.5 that ``model.base_architecture`` (``--architecture``) names before the folder exists; an
  IP-Adapter-Plus of that UNet's layout, or none with ``model.use_ip_adapter: false``. The trainer's start-up plan
  (:func:`startup_plan`) counts the real models' tensors instead, and builds nothing on the device.
* The sharing across ranks (:class:`Parallelism`) is arithmetic on those counts: what DeepSpeed ZeRO-1/2/3 divides by
  the world size, what it casts to the training precision, which fp32 copies it keeps, what offload moves to the
  CPU. Optimizer states come from the configured optimizer itself, created on ``meta`` copies of the tensors it
  would see (:func:`optimizer_state_bytes`).
* The activations are the tensors one policy forward keeps for the backward pass, counted by
  :class:`AllocationTracker` while the ``meta`` model runs (:func:`activation_bytes`).

Not counted (they need a GPU to measure): the CUDA context, the caching allocator's reserve and fragmentation, NCCL
buffers, DeepSpeed's communication buckets and ZeRO-3's gathered layers in flight, and the short-lived tensors of a
step (the loss, the no-grad reference forward, a checkpointed block's recomputation).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from patchdpo_fast.config import TrainConfig
    from patchdpo_fast.models import PatchDPOModels

__all__ = [
    "BASE_ARCHITECTURES",
    "OFFLOAD_CHOICES",
    "AllocationTracker",
    "MemoryItem",
    "MemoryPlan",
    "ModelArchitecture",
    "Parallelism",
    "TensorCensus",
    "activation_bytes",
    "compare_markdown",
    "component_parameters",
    "configured_models",
    "estimate_memory",
    "held_bytes",
    "memory_plan",
    "optimizer_state_bytes",
    "parallelism_from_config",
    "plan_from_census",
    "resolve_architecture",
    "startup_plan",
    "tensor_bytes",
]

GIB = 1024**3
logger = logging.getLogger("patchdpo_fast.train")

#: ``--offload`` / ``offload=`` values: what DeepSpeed moves to CPU memory
OFFLOAD_CHOICES = ("none", "optimizer", "param", "optimizer+param")

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FP32 = torch.float32.itemsize


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def held_bytes(ip_unet: Any, optimizer: Any, reference_model: Any = None) -> dict[str, int]:
    """What a built run really holds, per plan category: ``weights`` (the policy model's tensors but its in-module
    reference adapter), ``optimizer`` (every state tensor) and ``reference`` (the in-module reference adapter plus
    the separate frozen ``reference_model``, if any). Compared with a :class:`MemoryPlan` by the tests and
    ``benchmarks/gpu_memory_check.py``; gradients are measured by the caller before the step frees them."""
    from torch.utils import _pytree as pytree

    ref_ids = {id(p) for p in ip_unet.reference_parameters()} if ip_unet.has_reference else set()
    separate = 0
    if reference_model is not None:
        separate = tensor_bytes((*reference_model.parameters(), *reference_model.buffers()))
    return {
        "weights": tensor_bytes(t for t in (*ip_unet.parameters(), *ip_unet.buffers()) if id(t) not in ref_ids),
        "optimizer": tensor_bytes(pytree.tree_leaves(dict(optimizer.state))),
        "reference": tensor_bytes(p for p in ip_unet.parameters() if id(p) in ref_ids) + separate,
    }


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


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------

#: categories of :class:`MemoryItem`, in the order of the table
CATEGORIES = ("weights", "gradients", "optimizer", "reference", "ema", "activations")


@dataclass(frozen=True)
class MemoryItem:
    """One line of a :class:`MemoryPlan`.

    Attributes:
        name: the line's name (``trainable weights``, ``gradients``, ...).
        bytes: bytes this line holds on each GPU.
        detail: how the bytes come about (parameters, dtype, the share of the ranks).
        category: one of :data:`CATEGORIES`.
        resident: whether ``bytes`` counts in the per-GPU total (the encoders are released once the input cache
            is built: shown, not counted).
        host_bytes: bytes moved to CPU memory by DeepSpeed offload, per rank (not in the GPU total).
    """

    name: str
    bytes: int
    detail: str
    category: str = "weights"
    resident: bool = True
    host_bytes: int = 0


@dataclass
class MemoryPlan:
    """Memory of one training process (one GPU), item by item, with the totals by category.

    ``settings`` records what the plan assumed (mode, world size, ZeRO stage, offload, precision, optimizer, ...);
    ``notes`` what the figures leave out for this configuration.
    """

    items: list[MemoryItem]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> MemoryItem:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(f"no memory item {name!r}; items: {[i.name for i in self.items]}")

    def category_bytes(self, category: str) -> int:
        """Per-GPU bytes of the resident items of ``category`` (see :data:`CATEGORIES`)."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
        return sum(i.bytes for i in self.items if i.resident and i.category == category)

    @property
    def weights_bytes(self) -> int:
        """Trainable and frozen weights of the policy on one GPU (encoders only while they stay resident)."""
        return self.category_bytes("weights")

    @property
    def gradients_bytes(self) -> int:
        """Gradients on one GPU (low-precision gradients, DDP buckets, DeepSpeed's fp32 gradient partition)."""
        return self.category_bytes("gradients")

    @property
    def optimizer_bytes(self) -> int:
        """fp32 master weights and optimizer states on one GPU (0 when offloaded to the CPU)."""
        return self.category_bytes("optimizer")

    @property
    def reference_bytes(self) -> int:
        """The DPO reference model on one GPU (0 for a LoRA, whose reference is the UNet with the LoRA off)."""
        return self.category_bytes("reference")

    @property
    def ema_bytes(self) -> int:
        """The fp32 moving average of the trainable weights (``optim.use_ema``)."""
        return self.category_bytes("ema")

    @property
    def activations_bytes(self) -> int:
        """Activations one micro-batch's forward keeps for the backward pass."""
        return self.category_bytes("activations")

    @property
    def weights_and_optimizer_bytes(self) -> int:
        """Weights + gradients + optimizer + reference + EMA: every resident item but the activations."""
        return self.total_bytes - self.activations_bytes

    @property
    def total_bytes(self) -> int:
        """Sum of the resident items: what one GPU holds for the run (see the module docstring for what is not)."""
        return sum(item.bytes for item in self.items if item.resident)

    @property
    def host_bytes(self) -> int:
        """CPU memory per rank that DeepSpeed offload holds instead of the GPU."""
        return sum(item.host_bytes for item in self.items)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: settings, items, totals by category, the total, host bytes and notes."""
        return {
            "settings": dict(self.settings),
            "items": [asdict(item) for item in self.items],
            "bytes": {c: self.category_bytes(c) for c in CATEGORIES},
            "total_bytes": self.total_bytes,
            "host_bytes": self.host_bytes,
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """A markdown table (GiB per GPU with three decimals; a host column when offload moves anything)."""
        host = self.host_bytes > 0
        lines = ["| item | GiB per GPU |" + (" host GiB |" if host else "") + " what |",
                 "| --- | ---: |" + (" ---: |" if host else "") + " --- |"]  # fmt: skip
        for item in self.items:
            gib = f"{item.bytes / GIB:.3f}" if item.resident else f"({item.bytes / GIB:.3f})"
            extra = f" {item.host_bytes / GIB:.3f} |" if host else ""
            lines.append(f"| {item.name} | {gib} |{extra} {item.detail} |")
        extra = f" **{self.host_bytes / GIB:.3f}** |" if host else ""
        lines.append(f"| **total** | **{self.total_bytes / GIB:.3f}** |{extra} resident items; (..) not counted |")
        return "\n".join(lines)

    def summary(self) -> str:
        """A compact multi-line table for the training log (GiB per GPU)."""
        s = self.settings
        model = f"; {s['model']}" if s.get("model") else ""
        head = (f"memory plan per GPU ({s.get('trainable')}, {s.get('loss')}, {s.get('parallel')}, "
                f"{s.get('optimizer')}, precision {s.get('mixed_precision')}{model}):")  # fmt: skip
        width = max(len(i.name) for i in self.items)
        rows = [head]
        for item in self.items:
            value = f"{item.bytes / GIB:8.3f}" if item.resident else f"({item.bytes / GIB:.3f})".rjust(8)
            host = f" +{item.host_bytes / GIB:.3f} host" if item.host_bytes else ""
            rows.append(f"  {item.name:<{width}} {value} GiB{host}  {item.detail}")
        host = f" (+{self.host_bytes / GIB:.3f} GiB host memory per rank)" if self.host_bytes else ""
        rows.append(f"  {'total':<{width}} {self.total_bytes / GIB:8.3f} GiB{host}; not counted: CUDA context, "
                    "allocator cache, NCCL and DeepSpeed buffers")  # fmt: skip
        return "\n".join(rows)


def compare_markdown(plans: dict[str, MemoryPlan]) -> str:
    """Several plans side by side as one markdown table (GiB per GPU, three decimals): a column per plan.

    Items a plan does not count in its total are shown in parentheses; rows follow the first plan's order. A last
    row gives the host memory per rank when some plan offloads.
    """
    names: list[str] = []
    for plan in plans.values():
        names += [item.name for item in plan.items if item.name not in names]
    lines = ["| GiB | " + " | ".join(plans) + " |", "| --- |" + " ---: |" * len(plans)]
    for name in names:
        cells = []
        for plan in plans.values():
            item = next((i for i in plan.items if i.name == name), None)
            if item is None:
                cells.append("")
            else:
                cells.append(f"{item.bytes / GIB:.3f}" if item.resident else f"({item.bytes / GIB:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p.total_bytes / GIB:.3f}**" for p in plans.values()) + " |")
    if any(p.host_bytes for p in plans.values()):
        lines.append("| host (offload) | " + " | ".join(f"{p.host_bytes / GIB:.3f}" for p in plans.values()) + " |")
    return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _params(numel: int) -> str:
    return f"{numel / 1e9:.3f} B params" if numel >= 1e8 else f"{numel / 1e6:.2f} M params"


# ---------------------------------------------------------------------------------------------------------------
# How the ranks share the memory
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parallelism:
    """How one training process's memory is shared with the others.

    Attributes:
        world_size: number of ranks (GPUs), N.
        zero_stage: DeepSpeed ZeRO stage 0-3, or None without DeepSpeed (plain PyTorch; DDP when N > 1).
        offload_optimizer: DeepSpeed moves the fp32 master weights, the optimizer states and the fp32 gradient
            partition to the CPU.
        offload_param: ZeRO-3 moves the partitioned parameters (policy and reference) to the CPU.
        mixed_precision: ``train.mixed_precision`` (``no``, ``bf16``, ``fp16``): under DeepSpeed every parameter of
            the policy (and of a ZeRO-3 reference) is cast to it, with fp32 master weights in the optimizer.
        persistence_threshold: ZeRO-3 keeps parameters of at most this many elements whole on every rank
            (``stage3_param_persistence_threshold``; DeepSpeed's default 100000).
        reduce_bucket_size, allgather_bucket_size, prefetch_bucket_size, max_live_parameters: the JSON's buffer
            sizes in elements (reported as not counted).
        deepspeed_optimizer: the DeepSpeed JSON has an ``optimizer`` block (DeepSpeed builds its AdamW).
    """

    world_size: int = 1
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_param: bool = False
    mixed_precision: str = "no"
    persistence_threshold: int = 100_000
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    prefetch_bucket_size: int | None = None
    max_live_parameters: int | None = None
    deepspeed_optimizer: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive integer (number of GPUs), got {self.world_size!r}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3 (or None without DeepSpeed), got {self.zero_stage!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if (self.offload_optimizer or self.offload_param) and self.zero_stage is None:
            raise ValueError("offload needs DeepSpeed ZeRO: give a zero stage (--zero-stage / zero_stage=)")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"parameter offload needs ZeRO stage 3, got stage {self.zero_stage}")

    @property
    def deepspeed(self) -> bool:
        """Whether the run goes through DeepSpeed."""
        return self.zero_stage is not None

    @property
    def low_precision(self) -> torch.dtype | None:
        """The dtype DeepSpeed casts the module's parameters to (None: no cast)."""
        return _LOW_PRECISION.get(self.mixed_precision) if self.deepspeed else None

    def describe(self) -> str:
        """E.g. ``8 GPUs, ZeRO-3, optimizer offload`` or ``1 GPU, no DeepSpeed``."""
        gpus = f"{self.world_size} GPU" + ("s" if self.world_size > 1 else "")
        if not self.deepspeed:
            return f"{gpus}, no DeepSpeed" + (" (DDP)" if self.world_size > 1 else "")
        off = [n for n, on in (("optimizer", self.offload_optimizer), ("param", self.offload_param)) if on]
        return f"{gpus}, ZeRO-{self.zero_stage}" + (f", {'+'.join(off)} offload" if off else "")


def _parse_offload(offload: str | None) -> tuple[bool, bool] | None:
    if offload is None:
        return None
    key = str(offload).strip().lower().replace(",", "+").replace(" ", "")
    key = {"both": "optimizer+param", "param+optimizer": "optimizer+param", "": "none"}.get(key, key)
    if key not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_CHOICES)}, got {offload!r}")
    return "optimizer" in key, "param" in key


def parallelism_from_config(
    cfg: TrainConfig,
    world_size: int | None = None,
    zero_stage: int | None = None,
    offload: str | None = None,
) -> Parallelism:
    """The :class:`Parallelism` of ``cfg`` as the trainer resolves its DeepSpeed config, with overrides.

    The ZeRO stage and offload come from the config's DeepSpeed settings (``deepspeed.config`` JSON and the
    ``deepspeed.*`` overrides, via :func:`~patchdpo_fast.config.resolve_deepspeed_config`); ``zero_stage`` and
    ``offload`` (one of :data:`OFFLOAD_CHOICES`) override them, and a ``zero_stage`` on a config without DeepSpeed
    accounts it as if ``deepspeed.zero_stage`` were set.

    Raises:
        ValueError: a world size below 1, an unknown stage or offload, parameter offload below stage 3, offload
            without ZeRO, 8-bit AdamW with optimizer offload, or ``optim.use_ema`` under ZeRO-3 (one line each).
    """
    from patchdpo_fast.config import ConfigError, resolve_deepspeed_config

    world = 1 if world_size is None else world_size
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world_size must be a positive integer (number of GPUs), got {world!r}")
    if zero_stage is not None and (isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3)):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    offloads = _parse_offload(offload)
    ds = cfg.deepspeed.model_copy(deep=True)
    if zero_stage is not None:
        ds.zero_stage = zero_stage
    if offloads is not None:
        if not ds.enabled:
            raise ValueError("offload needs DeepSpeed ZeRO: give a zero stage (--zero-stage) or a deepspeed.config")
        ds.offload_optimizer, ds.offload_param = offloads
    try:
        conf = resolve_deepspeed_config(cfg.model_copy(update={"deepspeed": ds}), world)
    except ConfigError as exc:
        raise ValueError("; ".join(f"{k}: {m}" if k else m for k, m in exc.problems)) from None
    if conf is None:
        return Parallelism(world_size=world, mixed_precision=cfg.train.mixed_precision)
    zero = conf.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if cfg.optim.use_ema and stage == 3:
        raise ValueError("optim.use_ema needs whole weights on every rank, but ZeRO-3 shards them")

    def on(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")) != "none"

    def num(key: str, default: int | None = None) -> int | None:
        value = zero.get(key, default)
        return None if value is None else int(value)

    return Parallelism(
        world_size=world,
        zero_stage=stage,
        offload_optimizer=on("offload_optimizer"),
        offload_param=on("offload_param"),
        mixed_precision=cfg.train.mixed_precision,
        persistence_threshold=num("stage3_param_persistence_threshold", 100_000) or 0,
        reduce_bucket_size=num("reduce_bucket_size", 500_000_000),
        allgather_bucket_size=num("allgather_bucket_size", 500_000_000) if stage in (1, 2) else None,
        prefetch_bucket_size=num("stage3_prefetch_bucket_size", 50_000_000) if stage == 3 else None,
        max_live_parameters=num("stage3_max_live_parameters", 1_000_000_000) if stage == 3 else None,
        deepspeed_optimizer="optimizer" in conf,
    )


# ---------------------------------------------------------------------------------------------------------------
# What the models hold
# ---------------------------------------------------------------------------------------------------------------

#: one tensor of a census: (elements, dtype, is a parameter (False: a buffer))
Entry = tuple[int, torch.dtype, bool]


@dataclass
class TensorCensus:
    """The tensors of a run's models, counted (numel and dtype per tensor), without their data.

    Attributes:
        trainable: the parameters that train (adapter K/V and resampler, LoRA, or the UNet), as built.
        frozen: the policy module's other parameters and buffers (frozen UNet, frozen resampler).
        reference_adapter: the frozen in-module reference adapter (DPO losses with the adapter training).
        reference_model: the separate frozen reference model of full UNet finetuning with a DPO loss, as built
            (in ``model.reference_dtype``); None without one.
        encoders: VAE, text encoders and image encoder (released once the input cache is built).
        trains: what trains, in words.
        lora_numel: elements of the UNet LoRA (0 without one).
        encoder_names: what ``encoders`` holds, in words (``VAE``, ``text encoder``, ...; empty: not said).
    """

    trainable: list[Entry]
    frozen: list[Entry]
    reference_adapter: list[Entry] = field(default_factory=list)
    reference_model: list[Entry] | None = None
    encoders: list[Entry] = field(default_factory=list)
    trains: str = ""
    lora_numel: int = 0
    encoder_names: tuple[str, ...] = ()

    @property
    def trainable_numel(self) -> int:
        """Ψ: elements that train."""
        return sum(n for n, _, _ in self.trainable)


def _entries(named: Iterable[tuple[str, torch.Tensor]], is_param: bool, seen: set[int]) -> list[Entry]:
    out = []
    for _, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((t.numel(), t.dtype, is_param))
    return out


def census_of_module(module: torch.nn.Module) -> list[Entry]:
    """Every distinct parameter and buffer of ``module`` as census entries."""
    seen: set[int] = set()
    return _entries(module.named_parameters(), True, seen) + _entries(module.named_buffers(), False, seen)


def census_of_models(
    models: PatchDPOModels, reference_model: torch.nn.Module | None = None, trains: str | None = None
) -> TensorCensus:
    """:class:`TensorCensus` of a built bundle (meta or real): the policy ``models.ip_unet`` split into trainable,
    frozen and in-module reference tensors, the encoders still held, and ``reference_model`` if given."""
    ip_unet = models.ip_unet
    seen: set[int] = set()
    ref_ids = {id(p) for p in ip_unet.reference_parameters()} if getattr(ip_unet, "has_reference", False) else set()
    named = list(ip_unet.named_parameters())
    trainable = _entries([(n, p) for n, p in named if p.requires_grad], True, seen)
    reference = _entries([(n, p) for n, p in named if id(p) in ref_ids], True, seen)
    frozen = _entries(named, True, seen) + _entries(ip_unet.named_buffers(), False, seen)
    named_encoders = [("VAE", models.vae), ("text encoder", models.text_encoder),
                      ("text encoder 2", models.text_encoder_2), ("image encoder", models.image_encoder)]  # fmt: skip
    encoders = [m for _, m in named_encoders if m is not None]
    enc = [e for m in encoders for e in census_of_module(m)]
    names = [n for n, m in named_encoders if m is not None]
    if "text encoder 2" in names:
        names = [n for n in names if n != "text encoder 2"]
        names[names.index("text encoder")] = "2 text encoders"
    lora = sum(p.numel() for _, p in ip_unet.unet_lora_parameters()) if hasattr(ip_unet, "unet_lora_parameters") else 0
    if trains is None:
        parts = []
        adapter = getattr(ip_unet, "train_adapter", True) and ip_unet.image_proj is not None
        if adapter and any(p.requires_grad for p in ip_unet.image_proj.parameters()):
            parts.append("IP K/V + resampler")
        elif adapter:
            parts.append("IP K/V")
        if getattr(ip_unet, "train_unet", False):
            parts.append("UNet")
        elif lora:
            parts.append("UNet LoRA")
        trains = " + ".join(parts) or "nothing"
    ref_model = census_of_module(reference_model) if reference_model is not None else None
    return TensorCensus(trainable, frozen, reference, ref_model, enc, trains, lora, tuple(names))


# ---------------------------------------------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------------------------------------------


def _place(entries: Sequence[Entry], par: Parallelism, cast: bool = True) -> tuple[int, int, dict[str, int]]:
    """Bytes of module tensors per GPU and on the host, and the per-GPU bytes by dtype.

    Under DeepSpeed with mixed precision the parameters are cast to the low-precision dtype (``cast``), buffers
    keep theirs. ZeRO-3 stores ``ceil(numel / N)`` of each parameter on every rank (on the CPU with parameter
    offload), and keeps the parameters at or below the persistence threshold whole on every rank as well.
    """
    lp = par.low_precision if cast else None
    n = par.world_size
    device = host = 0
    by_dtype: dict[str, int] = {}
    for numel, dtype, is_param in entries:
        if is_param and lp is not None and dtype.is_floating_point:
            dtype = lp
        size = dtype.itemsize
        if is_param and par.zero_stage == 3:
            part = math.ceil(numel / n) * size
            on_gpu = 0 if par.offload_param else part
            host += part if par.offload_param else 0
            if numel <= par.persistence_threshold:
                on_gpu += numel * size  # gathered once, kept whole
        else:
            on_gpu = numel * size
        device += on_gpu
        by_dtype[_dtype_name(dtype)] = by_dtype.get(_dtype_name(dtype), 0) + on_gpu
    return device, host, by_dtype


def _by_dtype(entries: Sequence[Entry], by_dtype: dict[str, int], lp: torch.dtype | None = None) -> str:
    """Elements per dtype as placed (floating parameters counted in ``lp`` when DeepSpeed casts them to it)."""
    numel: dict[str, int] = {}
    for n, dtype, is_param in entries:
        if is_param and lp is not None and dtype.is_floating_point:
            dtype = lp
        numel[_dtype_name(dtype)] = numel.get(_dtype_name(dtype), 0) + n
    return " + ".join(f"{_params(numel[d]) if d in numel else ''} {d}".strip() for d in by_dtype if by_dtype[d])


def _share(par: Parallelism, divided: bool) -> str:
    return f"1/{par.world_size} per rank" if divided and par.world_size > 1 else "whole on every rank"


def plan_from_census(
    census: TensorCensus,
    par: Parallelism,
    *,
    optimizer: str = "adamw",
    use_ema: bool = False,
    cache_enabled: bool = True,
    activation_bytes_per_pair: int | None = None,
    pairs_per_batch: int = 1,
    resolution: int = 512,
    gradient_checkpointing: bool = False,
    settings: dict[str, Any] | None = None,
) -> MemoryPlan:
    """The per-GPU :class:`MemoryPlan` of ``census`` shared as ``par`` says (the formula of ``docs/memory.md``).

    Args:
        census: the run's tensors (:func:`census_of_models`).
        par: world size, ZeRO stage, offload and precision.
        optimizer: ``adamw`` or ``adamw8bit`` (the trainer's optimizer; a DeepSpeed JSON ``optimizer`` block builds
            DeepSpeed's AdamW, fp32 moments as well).
        use_ema: ``optim.use_ema``: an fp32 copy of the trainable weights.
        cache_enabled: the encoders are released once the input cache is built (shown, not counted).
        activation_bytes_per_pair: :func:`activation_bytes` of one pair (None: no activations line).
        pairs_per_batch, resolution, gradient_checkpointing: for the activations line.
        settings: extra settings to record.
    """
    n = par.world_size
    stage = par.zero_stage
    psi = census.trainable_numel
    part = math.ceil(psi / n)
    ds = par.deepspeed
    lp = par.low_precision
    items: list[MemoryItem] = []

    # weights
    dev, host, by = _place(census.trainable, par)
    items.append(MemoryItem("trainable weights", dev, f"{census.trains}: {_by_dtype(census.trainable, by, lp) or '0'}"
                            f"{'' if stage != 3 else ', ZeRO-3 partitioned'}", "weights", host_bytes=host))  # fmt: skip
    dev, host, by = _place(census.frozen, par)
    frozen_numel = sum(e[0] for e in census.frozen)
    detail = _by_dtype(census.frozen, by, lp) if frozen_numel else "none"
    if stage == 3 and frozen_numel:
        detail += ", ZeRO-3 partitioned"
    items.append(MemoryItem("frozen weights", dev, detail, "weights", host_bytes=host))
    enc = sum(numel * dtype.itemsize for numel, dtype, _ in census.encoders)
    if census.encoders:
        which = " + ".join(census.encoder_names) or "VAE + text encoders + image encoder"
        what = (f"{which}; released once the input cache is built" if cache_enabled
                else f"{which}, run every step (no input cache)")  # fmt: skip
        items.append(MemoryItem("encoders", enc, what, "weights", resident=not cache_enabled))

    # gradients
    if not ds:
        grad = sum(numel * dtype.itemsize for numel, dtype, _ in census.trainable)
        detail = "one per trainable weight, in its dtype"
        if n > 1:
            grad *= 2
            detail += "; x2: DDP's gradient buckets (a second copy)"
        items.append(MemoryItem("gradients", grad, detail, "gradients"))
    else:
        g = lp.itemsize if lp is not None else _FP32
        gname = _dtype_name(lp) if lp is not None else "float32"
        divided = stage >= 2
        low = (part if divided else psi) * g
        fp32_part = part if stage >= 1 else (psi if lp is not None else 0)
        fp32 = fp32_part * _FP32
        dev_g, host_g = low, 0
        detail = f"{gname} gradients {_share(par, divided)}"
        if fp32:
            detail += f" + fp32 gradient {'partition' if stage >= 1 else 'accumulator'} for the update"
        if par.offload_optimizer:
            if divided:  # ZeRO-2/3 offload reduce into a pinned fp32 CPU partition
                dev_g, host_g = 0, part * _FP32
                detail = f"{gname} gradients reduced into an fp32 partition in CPU memory (optimizer offload)"
            else:
                host_g = fp32
                detail += " (in CPU memory)"
        else:
            dev_g += fp32
        items.append(MemoryItem("gradients", dev_g, detail, "gradients", host_bytes=host_g))

    # optimizer: master weights and states
    if (ds and stage >= 1) or lp is not None:
        divided = stage >= 1 or par.mixed_precision == "bf16"  # stage 0: bf16 partitions it, fp16 does not
        master_elems = part if divided else psi
        master = master_elems * _FP32
        detail = f"fp32 copy of the trainable weights, {_share(par, divided)}"
        if par.offload_optimizer:
            items.append(MemoryItem("master weights", 0, detail + " (in CPU memory)", "optimizer", host_bytes=master))
        else:
            items.append(MemoryItem("master weights", master, detail, "optimizer"))
        state_elems = master_elems
    else:
        divided = False
        items.append(MemoryItem("master weights", 0, "none: the trainable weights are the fp32 master weights"
                                if census.trainable and census.trainable[0][1] == torch.float32
                                else "none", "optimizer"))  # fmt: skip
        state_elems = psi
    opt_name = "adamw" if par.deepspeed_optimizer else optimizer
    if ds and (stage >= 1 or lp is not None):  # DeepSpeed's optimizer sees flat fp32 partitions
        shapes = [((state_elems,), torch.float32)] if state_elems else []
    else:  # the trainer's optimizer sees the parameters themselves
        shapes = [((numel,), dtype) for numel, dtype, _ in census.trainable]
    state = optimizer_state_bytes_for(shapes, opt_name)
    names = {"adamw": "AdamW: 2 fp32 moments per weight",
             "adamw8bit": "bitsandbytes AdamW8bit: 2 blockwise 8-bit moments per weight"}  # fmt: skip
    what = names.get(opt_name, opt_name)
    if par.deepspeed_optimizer:
        what = "DeepSpeed AdamW (JSON optimizer block): 2 fp32 moments per weight"
    what += f", {_share(par, divided)}" if ds else ""
    if par.offload_optimizer:
        items.append(MemoryItem("optimizer state", 0, what + " (in CPU memory)", "optimizer", host_bytes=state))
    else:
        items.append(MemoryItem("optimizer state", state, what, "optimizer"))

    # the DPO reference
    if census.reference_model is not None:
        if stage == 3:
            # the reference engine keeps model.reference_dtype (the census's dtypes), whatever the policy trains in
            dev, host, by = _place(census.reference_model, par, cast=False)
            detail = "frozen copy of the initial UNet + adapter, ZeRO-3 partitioned (DeepSpeed inference engine)"
            ref_lp = None
        else:
            dev, host, by = _place(census.reference_model, Parallelism(world_size=n), cast=False)
            detail = "frozen copy of the initial UNet + adapter, whole on every rank"
            ref_lp = None
        detail += f": {_by_dtype(census.reference_model, by, ref_lp)}"
        items.append(MemoryItem("DPO reference", dev, detail, "reference", host_bytes=host))
    elif census.reference_adapter:
        dev, host, by = _place(census.reference_adapter, par)
        detail = f"frozen copy of the initial adapter: {_by_dtype(census.reference_adapter, by, lp)}"
        items.append(MemoryItem("DPO reference", dev, detail, "reference", host_bytes=host))
    else:
        uses_reference = bool((settings or {}).get("uses_reference", True))
        why = "none"
        if not uses_reference:
            why = "none: only patch_dpo / diffusion_dpo build it"
        elif census.lora_numel:
            why = "none: the same UNet with its LoRA switched off"
        items.append(MemoryItem("DPO reference", 0, why, "reference"))

    # EMA
    if use_ema:
        if stage == 3:
            raise ValueError("optim.use_ema needs whole weights on every rank, but ZeRO-3 shards them")
        items.append(MemoryItem("EMA", psi * _FP32, "fp32 moving average of the trainable weights, whole on every "
                                "rank", "ema"))  # fmt: skip
    else:
        items.append(MemoryItem("EMA", 0, "off (optim.use_ema)", "ema"))

    notes = []
    if activation_bytes_per_pair is not None:
        ckpt = "with" if gradient_checkpointing else "without"
        items.append(MemoryItem(f"activations ({pairs_per_batch} pairs)", activation_bytes_per_pair * pairs_per_batch,
                                f"{activation_bytes_per_pair / GIB:.3f} GiB per pair at {resolution} px, {ckpt} "
                                "gradient checkpointing", "activations"))  # fmt: skip
    if ds:
        g = (lp or torch.float32).itemsize
        if par.reduce_bucket_size:
            notes.append(f"DeepSpeed reduce bucket: up to {par.reduce_bucket_size:.3g} elements "
                         f"({par.reduce_bucket_size * g / GIB:.2f} GiB), not counted")  # fmt: skip
        if stage == 3 and par.max_live_parameters:
            notes.append(f"ZeRO-3 gathers each layer's full parameters for its forward/backward (prefetch "
                         f"{par.prefetch_bucket_size or 0:.3g}, at most {par.max_live_parameters:.3g} elements live), "
                         "not counted")  # fmt: skip
    notes.append("not counted: CUDA context, caching-allocator reserve and fragmentation, NCCL buffers")
    all_settings = {
        "parallel": par.describe(),
        "world_size": n,
        "zero_stage": stage,
        "offload_optimizer": par.offload_optimizer,
        "offload_param": par.offload_param,
        "mixed_precision": par.mixed_precision,
        "optimizer": opt_name,
        "trainable_params": psi,
        "pairs_per_batch": pairs_per_batch,
        "resolution": resolution,
        "cache_enabled": cache_enabled,
        "gradient_checkpointing": gradient_checkpointing,
        "use_ema": use_ema,
        **(settings or {}),
    }
    if activation_bytes_per_pair is not None:
        all_settings["activation_bytes_per_pair"] = activation_bytes_per_pair
    return MemoryPlan(items, all_settings, notes)


def optimizer_state_bytes(
    parameters: Iterable[torch.nn.Parameter], optimizer: str = "adamw", **optim_kwargs: Any
) -> int:
    """Bytes of the state that ``optimizer`` (as :func:`~patchdpo_fast.training.optim.build_optimizer` builds it)
    keeps for ``parameters``, found by letting the optimizer create its state on ``meta`` copies of them.

    ``adamw``: PyTorch AdamW runs one step on the meta copies; ``adamw8bit``: bitsandbytes initializes its
    (blockwise 8-bit, 32-bit below 4096 elements) state as it does at its first step. Nothing is allocated.
    """
    from patchdpo_fast.training.optim import build_optimizer

    metas = [torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta")) for p in parameters]
    if not metas:
        return 0
    kwargs = {"lr": 1e-4, "weight_decay": 0.0, **optim_kwargs}
    opt = build_optimizer(metas, optimizer, **kwargs)
    if hasattr(opt, "init_state"):  # bitsandbytes: its own state initialization, without running its kernels
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                opt.init_state(group, p, gindex, pindex)
    else:
        for p in metas:
            p.grad = torch.empty_like(p)
        opt.step()
    return tensor_bytes(pytree.tree_leaves(dict(opt.state)))


class _MetaFlashAttention(TorchFunctionMode):
    """On ``meta`` tensors, route SDPA to the memory-efficient (flash) kernel's meta function.

    Without it the meta device decomposes SDPA into the math path, which keeps the full attention matrix: what a GPU
    (flash / memory-efficient SDPA) or the CPU (flash kernel) never does. The flash path saves q, k, v, the output
    and a per-row logsumexp, as on the accelerator.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            q, k, v = args[:3]
            simple = kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and len(args) == 3
            if simple:
                flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
                return flash(q, k, v, 0.0, bool(kwargs.get("is_causal", False)), scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def _step_inputs(models: PatchDPOModels, images: int, resolution: int, feature_dtype: torch.dtype) -> tuple:
    """Inputs of one policy forward (as the training loop passes them) on the UNet's device."""
    unet, dev = models.unet, models.device
    cfg = unet.config
    latent = resolution // 8
    pooled = time_ids = image_features = None
    if models.added_conditioning:  # SDXL-class: pooled text embedding + 6 micro-conditioning values
        pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        pooled = torch.zeros(images, pooled_dim, dtype=feature_dtype, device=dev)
        time_ids = torch.zeros(images, 6, device=dev)
    if models.image_proj is not None:  # with an IP-Adapter: the image encoder's penultimate hidden states
        if models.image_encoder is not None:
            enc = models.image_encoder.config
            tokens = (int(enc.image_size) // int(enc.patch_size)) ** 2 + 1
        else:  # released: IP-Adapter-Plus's ViT-H/14 at 224 px
            tokens = 257
        width = int(models.image_proj.config["embedding_dim"])
        image_features = torch.zeros(images, tokens, width, dtype=feature_dtype, device=dev)
    return (
        torch.zeros(images, int(cfg.in_channels), latent, latent, device=dev),
        torch.zeros(images, dtype=torch.long, device=dev),
        torch.zeros(images, 77, int(cfg.cross_attention_dim), dtype=feature_dtype, device=dev),
        pooled,
        time_ids,
        image_features,
    )


def activation_bytes(
    models: PatchDPOModels, pairs: int = 1, resolution: int = 512, feature_dtype: torch.dtype = torch.float32
) -> int:
    """Bytes that one policy forward of ``pairs`` pairs (``2 * pairs`` images) keeps alive for its backward pass.

    Counted with :class:`AllocationTracker` while the (already built) policy predicts the noise of zero inputs of
    the training loop's shapes: every tensor the forward allocates and autograd still holds when it returns, plus
    its output; gradient checkpointing, the attention backend and the dtypes are whatever ``models`` has. On
    ``meta`` models this costs no memory (SDPA is counted as the flash kernel keeps it, see
    :class:`_MetaFlashAttention`); on real models it runs the forward.
    """
    args = _step_inputs(models, 2 * pairs, resolution, feature_dtype)
    meta = models.device.type == "meta"
    with torch.enable_grad(), _MetaFlashAttention() if meta else contextlib.nullcontext():
        with AllocationTracker() as tracker:
            out = models.ip_unet(*args, use_reference=False)
        held = tracker.live_bytes()
    del out
    return held


def optimizer_state_bytes_for(shapes: Sequence[tuple[tuple[int, ...], torch.dtype]], optimizer: str = "adamw") -> int:
    """:func:`optimizer_state_bytes` for parameters given as ``(shape, dtype)`` (created on ``meta``)."""
    metas = [torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")) for shape, dtype in shapes]
    return optimizer_state_bytes(metas, optimizer)


def memory_plan(
    models: PatchDPOModels,
    *,
    optimizer: str = "adamw",
    pairs_per_batch: int = 1,
    resolution: int = 512,
    cache_enabled: bool = True,
    cache_dtype: torch.dtype = torch.float32,
    activations: bool = True,
    parallelism: Parallelism | None = None,
    reference_model: torch.nn.Module | None = None,
    use_ema: bool = False,
    settings: dict[str, Any] | None = None,
) -> MemoryPlan:
    """The per-GPU :class:`MemoryPlan` of built ``models`` (meta or real), shared as ``parallelism`` says.

    The tensors are counted from the objects (:func:`census_of_models`, ``reference_model`` being a separate frozen
    reference model when there is one); the activations are :func:`activation_bytes` of one pair times
    ``pairs_per_batch``, measured on ``models`` (free on ``meta``; on real models it runs a forward). Under
    DeepSpeed mixed precision the activations are measured on a ``meta`` twin cast as DeepSpeed casts the module.

    Args:
        models: the bundle (e.g. built on ``meta`` by :func:`estimate_memory`).
        optimizer: ``adamw`` or ``adamw8bit``.
        pairs_per_batch: pairs per micro-batch (``data.pairs_per_batch``).
        resolution: training resolution in pixels.
        cache_enabled: whether the input cache serves the inputs (``cache.enabled``).
        cache_dtype: dtype of the cached features fed to the UNet (``cache.dtype``).
        activations: measure the activations.
        parallelism: world size, ZeRO stage, offload and precision (default: one process without DeepSpeed).
        reference_model: the separate frozen reference model (full UNet finetuning with a DPO loss).
        use_ema: count the fp32 moving average.
        settings: extra settings to record in the plan.
    """
    par = parallelism or Parallelism()
    census = census_of_models(models, reference_model)
    per_pair = None
    if activations:
        feature_dtype = cache_dtype if cache_enabled else models.weight_dtype
        per_pair = activation_bytes(_activation_twin(models, par), 1, resolution, feature_dtype)
    extra = {
        "attention_backend": getattr(models.ip_unet, "attention_backend", None),
        "unet_dtype": _dtype_name(models.unet.conv_in.weight.dtype),
        **(settings or {}),
    }
    return plan_from_census(
        census,
        par,
        optimizer=optimizer,
        use_ema=use_ema,
        cache_enabled=cache_enabled,
        activation_bytes_per_pair=per_pair,
        pairs_per_batch=pairs_per_batch,
        resolution=resolution,
        gradient_checkpointing=bool(getattr(models.unet, "is_gradient_checkpointing", False)),
        settings=extra,
    )


def _meta_twin(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are empty ``meta`` tensors (floating parameters cast to
    ``dtype`` if given): the same structure, hooks and flags, without copying any data."""
    memo: dict[int, Any] = {}
    for t in module.parameters():
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        memo[id(t)] = torch.nn.Parameter(torch.empty(t.shape, dtype=cast, device="meta"), t.requires_grad)
    for t in module.buffers():
        memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return copy.deepcopy(module, memo)


def _activation_twin(models: PatchDPOModels, par: Parallelism) -> PatchDPOModels:
    """``models`` to measure the activations on: a ``meta`` twin of the policy when ``models`` is real or when
    DeepSpeed casts the module to the low precision; ``models`` itself otherwise."""
    import dataclasses

    lp = par.low_precision
    if models.device.type == "meta" and lp is None:
        return models
    return dataclasses.replace(models, ip_unet=_meta_twin(models.ip_unet, lp))


def _meta_models(cfg: TrainConfig, architecture: str | None = None) -> PatchDPOModels:
    """The configured models built on the ``meta`` device in the configured ``model.trainable`` mode.

    Shapes and dtypes only, no weights read: the architecture :func:`resolve_architecture` finds (tiny, the
    pretrained folder's configs, or a built-in SDXL / SD1.5); the UNet in fp32 when it trains in full (as
    ``build_models`` keeps it), the LoRA put on for the LoRA modes, the in-module reference adapter when the mode
    and loss need one, no IP-Adapter with ``model.use_ip_adapter: false``.
    """
    return configured_models(cfg, "meta", architecture=architecture)


#: ``model.base_architecture`` / ``estimate-memory --architecture`` values (besides ``auto``): the built-in base
#: architectures a plan can use while ``model.pretrained_path`` does not exist yet
BASE_ARCHITECTURES: tuple[str, ...] = ("sdxl", "sd15")
_FAMILY = {"sdxl": "SDXL", "sd15": "SD1.5"}


@dataclass(frozen=True)
class ModelArchitecture:
    """Which base model a plan builds, and where its shapes come from (:func:`resolve_architecture`).

    Attributes:
        family: ``sdxl`` (SDXL-class UNet: two text encoders, pooled text + time ids) or ``sd15`` (SD1.5-class: one
            text encoder, no added conditioning).
        source: ``tiny`` (``model.tiny_architecture``), ``folder`` (the ``config.json`` files of
            ``model.pretrained_path``), ``builtin`` (SDXL base 1.0 / SD1.5 at their real sizes, chosen by
            ``model.base_architecture`` or ``--architecture``), ``assumed`` (built-in SDXL, nothing said which) or
            ``loaded`` (the trainer's real models, in the start-up plan).
        ip_adapter: an IP-Adapter-Plus (image encoder, resampler, IP K/V) is built (``model.use_ip_adapter``).
        folder: the pretrained folder read (``source == "folder"``).
        image_encoder_folder: the image encoder folder whose ``config.json`` is read (None: the built-in ViT-H/14).
    """

    family: str
    source: str
    ip_adapter: bool = True
    folder: Path | None = None
    image_encoder_folder: Path | None = None

    @property
    def assumed(self) -> bool:
        """Nothing said which base model: the built-in SDXL architecture was assumed."""
        return self.source == "assumed"

    def describe(self) -> str:
        """E.g. ``SD1.5-class + IP-Adapter-Plus (built-in SD1.5 architecture, built-in ViT-H/14 image encoder)``."""
        name = f"tiny {self.family}" if self.source == "tiny" else f"{_FAMILY[self.family]}-class"
        name += " + IP-Adapter-Plus" if self.ip_adapter else ", no IP-Adapter"
        where = {
            "tiny": [],
            "loaded": [f"loaded from {self.folder}"],
            "folder": [f"configs of {self.folder}"],
            "builtin": [f"built-in {_FAMILY[self.family]} architecture"],
            "assumed": ["ASSUMED: built-in SDXL architecture"],
        }[self.source]
        if self.ip_adapter and self.source != "tiny":
            verb = "loaded from" if self.source == "loaded" else "configs of"
            where.append(f"image encoder {verb} {self.image_encoder_folder}" if self.image_encoder_folder is not None
                         else "built-in ViT-H/14 image encoder")  # fmt: skip
        return name + (f" ({', '.join(where)})" if where else "")

    def note(self) -> str | None:
        """What the output must say about the architecture (None when it was read or chosen explicitly)."""
        if self.source != "assumed":
            return None
        return ("architecture assumed: SDXL base 1.0 (model.pretrained_path does not exist and neither "
                "model.base_architecture nor --architecture says sdxl or sd15); set one of them to plan another base "
                "model")  # fmt: skip


def _check_architecture_choice(value: object, what: str) -> str:
    choice = str(value).strip().lower()
    if choice not in ("auto", *BASE_ARCHITECTURES):
        raise ValueError(f"unknown base architecture {value!r} ({what}); choose one of "
                         f"{', '.join(BASE_ARCHITECTURES)} or auto (read from model.pretrained_path)")  # fmt: skip
    return choice


def _folder_family(unet_config: dict[str, Any], where: Path) -> str:
    kind = unet_config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise ValueError(f"{where}: UNet addition_embed_type={kind!r} is not supported: SDXL-class UNets use "
                         "'text_time' (pooled text + time ids), SD1.5/SD2-class UNets none")  # fmt: skip
    return "sdxl" if kind == "text_time" else "sd15"


def resolve_architecture(cfg: TrainConfig, architecture: str | None = None) -> ModelArchitecture:
    """The base model the plan of ``cfg`` builds, found as documented (never guessed from a path's name).

    * ``model.tiny``: the tiny architecture ``model.tiny_architecture`` (``architecture`` must be None or ``auto``);
    * ``model.pretrained_path`` exists: its ``unet/config.json`` decides the family (``addition_embed_type:
      text_time`` = SDXL-class, none = SD1.5-class), and the models are built from its ``config.json`` files;
      a ``model.base_architecture`` / ``architecture`` naming the other family is an error;
    * the folder does not exist (planning before downloading): the built-in architecture ``architecture`` (the
      ``--architecture`` flag) or else ``model.base_architecture`` names; ``auto`` assumes SDXL base 1.0, and the
      result says so (:attr:`ModelArchitecture.assumed`, :meth:`ModelArchitecture.note`).

    The image encoder (with ``model.use_ip_adapter``) comes from ``model.image_encoder_path/config.json`` when that
    exists, else it is the built-in OpenCLIP ViT-H/14 of IP-Adapter-Plus (both families).

    Raises:
        ValueError: an unknown architecture, one given for the tiny model, a folder without ``unet/config.json``,
            or a folder whose UNet is of the other family than the one asked for.
    """
    m = cfg.model
    choice = _check_architecture_choice(m.base_architecture, "model.base_architecture")
    if architecture is not None:
        choice = _check_architecture_choice(architecture, "--architecture")
    if m.tiny:
        if choice != "auto":
            raise ValueError(f"base architecture {choice!r} given for the tiny model: model.tiny_architecture "
                             f"({m.tiny_architecture}) chooses the tiny model's; --architecture / "
                             "model.base_architecture apply to model.tiny: false")  # fmt: skip
        return ModelArchitecture(m.tiny_architecture, "tiny", m.use_ip_adapter)
    image_folder = None
    if m.use_ip_adapter and m.image_encoder_path is not None and (Path(m.image_encoder_path) / "config.json").is_file():
        image_folder = Path(m.image_encoder_path)
    folder = Path(m.pretrained_path) if m.pretrained_path is not None else None
    if folder is not None and folder.exists():
        unet_json = folder / "unet" / "config.json"
        if not unet_json.is_file():
            raise ValueError(f"model.pretrained_path {folder} has no unet/config.json: not a diffusers base-model "
                             "folder (the plan reads the architecture from it)")  # fmt: skip
        family = _folder_family(json.loads(unet_json.read_text(encoding="utf-8")), unet_json)
        if choice not in ("auto", family):
            layout = "addition_embed_type text_time" if family == "sdxl" else "no added conditioning"
            raise ValueError(f"base architecture {choice} asked for, but {unet_json} is an {_FAMILY[family]}-class "
                             f"UNet ({layout}): the folder's UNet decides; drop model.base_architecture / "
                             "--architecture or fix model.pretrained_path")  # fmt: skip
        return ModelArchitecture(family, "folder", m.use_ip_adapter, folder, image_folder)
    if choice == "auto":
        return ModelArchitecture("sdxl", "assumed", m.use_ip_adapter, None, image_folder)
    return ModelArchitecture(choice, "builtin", m.use_ip_adapter, None, image_folder)


def _folder_components(folder: Path, device: str | torch.device) -> dict[str, Any]:
    """The base model of a local diffusers folder built from its ``config.json`` files on ``device`` (no weights)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from patchdpo_fast.models.pixel_space import PixelSpaceAutoencoder, is_pixel_space_folder
    from patchdpo_fast.models.tiny import SDXL_DDPM_CONFIG, build_tiny_tokenizer

    def need(sub: str) -> Path:
        path = folder / sub
        if not (path / "config.json").is_file():
            raise ValueError(f"model.pretrained_path {folder}: {sub}/config.json not found (the plan builds the "
                             f"{sub} from it; no weights are read)")  # fmt: skip
        return path

    unet_cfg = UNet2DConditionModel.load_config(need("unet"))
    sdxl = _folder_family(dict(unet_cfg), folder / "unet" / "config.json") == "sdxl"
    vae_dir = need("vae")
    text_cfg = CLIPTextConfig.from_pretrained(need("text_encoder"), local_files_only=True)
    text_cfg_2 = CLIPTextConfig.from_pretrained(need("text_encoder_2"), local_files_only=True) if sdxl else None
    with torch.random.fork_rng(devices=[]), torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        if is_pixel_space_folder(vae_dir):
            vae = PixelSpaceAutoencoder.from_config(PixelSpaceAutoencoder.load_config(vae_dir))
        else:
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_dir))
        text_encoder = CLIPTextModel(text_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(text_cfg_2) if text_cfg_2 is not None else None
    scheduler_dir = folder / "scheduler"
    scheduler_cfg = DDPMScheduler.load_config(scheduler_dir) if (scheduler_dir / "scheduler_config.json").is_file() \
        else SDXL_DDPM_CONFIG  # fmt: skip
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": build_tiny_tokenizer(),  # only the 77-token length matters for memory
        "tokenizer_2": build_tiny_tokenizer() if sdxl else None,
        "scheduler": DDPMScheduler.from_config(scheduler_cfg),
    }


def _image_encoder(arch: ModelArchitecture, device: str | torch.device) -> torch.nn.Module:
    """The IP-Adapter-Plus image encoder of a pretrained architecture: the folder's config, or ViT-H/14."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from patchdpo_fast.models.sd15_config import SD15_IMAGE_ENCODER
    from patchdpo_fast.models.sdxl_config import SDXL_IMAGE_ENCODER

    if arch.image_encoder_folder is not None:
        config = CLIPVisionConfig.from_pretrained(arch.image_encoder_folder, local_files_only=True)
    else:
        config = CLIPVisionConfig(**(SD15_IMAGE_ENCODER if arch.family == "sd15" else SDXL_IMAGE_ENCODER))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        return CLIPVisionModelWithProjection(config).eval()


def configured_models(
    cfg: TrainConfig,
    device: str | torch.device = "meta",
    *,
    lora: bool = True,
    architecture: str | None = None,
) -> PatchDPOModels:
    """The models of ``cfg`` in its ``model.trainable`` mode with random weights on ``device`` (``meta``: shapes only).

    The base model is the one :func:`resolve_architecture` finds (``architecture``: as ``--architecture``): the
    tiny one of ``model.tiny_architecture``, the ``config.json`` files of an existing ``model.pretrained_path``, or
    a built-in SDXL / SD1.5 architecture; the IP-Adapter-Plus resampler has the layout ``build_models`` gives that
    UNet (:func:`~patchdpo_fast.models.build.default_resampler_config`: SDXL 1280 wide with 20 heads, SD1.5 768
    with 12), and ``model.use_ip_adapter: false`` builds no image encoder, resampler or IP layers.

    What the plan counts, built for real elsewhere too: ``benchmarks/gpu_memory_check.py`` runs one training step of
    these models on a GPU to compare the plan with the allocator. ``lora=False`` leaves the LoRA off (the caller puts
    it on with :func:`~patchdpo_fast.training.trainable.setup_trainable`, as the trainer does).
    """
    from patchdpo_fast.models.build import default_resampler_config
    from patchdpo_fast.models.sd15_config import build_sd15_components
    from patchdpo_fast.models.sdxl_config import assemble_models, build_sdxl_components
    from patchdpo_fast.models.tiny import build_tiny_components
    from patchdpo_fast.training.trainable import TrainableMode

    arch = resolve_architecture(cfg, architecture)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    m = cfg.model
    mode = TrainableMode.from_config(m)
    kwargs = mode.build_kwargs(cfg.loss.uses_reference_model)
    if arch.source == "tiny":
        with torch.device(device):
            components = build_tiny_components(m.tiny_seed, arch.family)
        components.setdefault("text_encoder_2", None)
        components.setdefault("tokenizer_2", None)
    elif arch.source == "folder":
        components = _folder_components(arch.folder, device)
        components["image_encoder"] = _image_encoder(arch, device) if arch.ip_adapter else None
    elif arch.family == "sd15":
        components = build_sd15_components(device)
    else:  # SDXL base 1.0 (built-in, or assumed and said so)
        components = build_sdxl_components(device)
    if arch.source in ("builtin", "assumed") and arch.image_encoder_folder is not None:
        components["image_encoder"] = _image_encoder(arch, device)  # the configured encoder's shape
    if not arch.ip_adapter:
        components["image_encoder"] = None
    for name in ("unet", "text_encoder", "text_encoder_2", "image_encoder"):  # the frozen weights' dtype
        if components.get(name) is not None:
            components[name].to(dtype)
    if kwargs["train_unet"]:
        components["unet"].to(torch.float32)  # trainable master weights, as build_models keeps them
    image_encoder = components["image_encoder"]
    embed_dim = int(image_encoder.config.hidden_size) if image_encoder is not None else 0
    resampler = default_resampler_config(components["unet"], embed_dim, m.num_ip_tokens, tiny=m.tiny)
    backend = "sdpa" if m.attention_backend == "xformers" else m.attention_backend  # same memory class
    models = assemble_models(
        components,
        weight_dtype=dtype,
        seed=m.tiny_seed,
        train_resampler=m.train_resampler,
        attention_backend=backend,
        ip_scale=m.ip_scale,
        num_ip_tokens=m.num_ip_tokens,
        resampler=resampler,
        gradient_checkpointing=m.gradient_checkpointing,
        reference=kwargs["reference"],
        train_unet=kwargs["train_unet"],
        train_adapter=kwargs["train_adapter"],
        use_ip_adapter=arch.ip_adapter,
    )
    if lora and mode.unet == "lora":
        cfg_lora = m.lora
        models.ip_unet.add_unet_lora(cfg_lora.rank, cfg_lora.effective_alpha, list(cfg_lora.target_modules),
                                     cfg_lora.dropout)  # fmt: skip
    return models


def _reference_census(cfg: TrainConfig, models: PatchDPOModels) -> list[Entry] | None:
    """The separate frozen reference model that :func:`~patchdpo_fast.training.trainable.setup_trainable` would copy
    (full UNet finetuning with a DPO loss): every policy tensor, floating ones in ``model.reference_dtype``."""
    from patchdpo_fast.training.trainable import TrainableMode, reference_dtype

    if TrainableMode.from_config(cfg.model).unet != "full" or not cfg.loss.uses_reference_model:
        return None
    dtype = reference_dtype(cfg)
    return [(n, dtype if d.is_floating_point else d, p) for n, d, p in census_of_module(models.ip_unet)]


def component_parameters(models: PatchDPOModels) -> dict[str, int]:
    """Parameters of each component of a built bundle (meta or real), by name.

    ``unet``: the base UNet alone (without the IP layers or a LoRA); ``text_encoder``, ``text_encoder_2``, ``vae``,
    ``image_encoder`` when present (not released); ``ip_adapter``: the policy adapter (resampler + IP K/V, without
    the frozen reference copy); ``unet_lora`` with a LoRA.
    """
    ip_unet = models.ip_unet
    out = {"unet": sum(p.numel() for n, p in models.unet.named_parameters()
                       if ".processor." not in n and "lora_" not in n)}  # fmt: skip
    for name in ("text_encoder", "text_encoder_2", "vae", "image_encoder"):
        module = getattr(models, name)
        if module is not None:
            out[name] = sum(p.numel() for p in module.parameters())
    if ip_unet.image_proj is not None:
        ref_ids = {id(p) for p in ip_unet.reference_parameters()} if ip_unet.has_reference else set()
        adapter = [*ip_unet.image_proj.parameters()]
        adapter += [p for proc in ip_unet.ip_processors.values() for p in proc.parameters() if id(p) not in ref_ids]
        out["ip_adapter"] = sum(p.numel() for p in adapter)
    if hasattr(ip_unet, "unet_lora_parameters"):
        lora = sum(p.numel() for _, p in ip_unet.unet_lora_parameters())
        if lora:
            out["unet_lora"] = lora
    return out


_COMPONENT_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2", "vae": "VAE",
                    "image_encoder": "image encoder", "ip_adapter": "IP-Adapter", "unet_lora": "LoRA"}  # fmt: skip


def _parameters_line(params: dict[str, int]) -> str:
    return ", ".join(f"{_COMPONENT_NAMES.get(k, k)} {v / 1e6:.2f} M" for k, v in params.items())


def _config_settings(cfg: TrainConfig, models: PatchDPOModels, arch: ModelArchitecture | None = None) -> dict[str, Any]:
    """What a plan records about the run: mode, loss, and the model (``arch``, or read from the built ``models``)."""
    from patchdpo_fast.training.trainable import TrainableMode

    if arch is None:  # the trainer's real models: the UNet's config says the family
        family = "sdxl" if models.added_conditioning else "sd15"
        m = cfg.model
        images = m.image_encoder_path if models.ip_unet.has_ip_adapter else None
        arch = ModelArchitecture(family, "tiny", models.ip_unet.has_ip_adapter) if m.tiny else \
            ModelArchitecture(family, "loaded", models.ip_unet.has_ip_adapter, m.pretrained_path, images)  # fmt: skip
    return {
        "trainable": TrainableMode.from_config(cfg.model).name,
        "loss": cfg.loss.type,
        "uses_reference": bool(cfg.loss.uses_reference_model),
        "model": arch.describe(),
        "architecture": arch.family,
        "architecture_source": arch.source,
        "ip_adapter": arch.ip_adapter,
        "parameters": component_parameters(models),
    }


def estimate_memory(
    cfg: TrainConfig,
    *,
    world_size: int | None = None,
    zero_stage: int | None = None,
    offload: str | None = None,
    activations: bool = True,
    architecture: str | None = None,
) -> MemoryPlan:
    """Per-GPU memory of the run ``cfg`` describes, without building anything on a device or reading weights.

    The models are built on ``meta`` in the configured ``model.trainable`` mode, with the base architecture
    :func:`resolve_architecture` finds: the tiny one (``model.tiny_architecture``), the ``config.json`` files of an
    existing ``model.pretrained_path`` (its UNet's config decides SDXL- or SD1.5-class), or, before the folder is
    downloaded, the built-in SDXL base 1.0 or SD1.5 that ``architecture`` / ``model.base_architecture`` names (SDXL
    assumed otherwise, and the plan's notes say so). The IP-Adapter-Plus has the layout of that UNet (none with
    ``model.use_ip_adapter: false``); the DPO reference is included exactly when ``loss.type`` needs it (a frozen
    copy in ``model.reference_dtype`` for full finetuning, the frozen initial adapter when the adapter trains,
    nothing for a LoRA).

    Args:
        cfg: the training config.
        world_size: number of GPUs (default 1).
        zero_stage: DeepSpeed ZeRO stage 0-3; default: the config's DeepSpeed settings (none: no DeepSpeed).
        offload: ``none``, ``optimizer``, ``param`` or ``optimizer+param``; default: the config's.
        activations: measure the activations of one micro-batch (a ``meta`` forward, a second or two at SDXL).
        architecture: ``sdxl`` / ``sd15`` / ``auto``, as ``--architecture``: overrides ``model.base_architecture``.

    Returns:
        The plan: ``plan.total_bytes``, ``weights_bytes``, ``gradients_bytes``, ``optimizer_bytes``,
        ``reference_bytes``, ``ema_bytes``, ``activations_bytes``, ``host_bytes``; ``plan.items`` line by line.

    Raises:
        ValueError: bad ``world_size`` / ``zero_stage`` / ``offload`` or a combination the trainer refuses; an
            unknown architecture, or one that contradicts ``model.pretrained_path`` (see :func:`resolve_architecture`).
    """
    par = parallelism_from_config(cfg, world_size, zero_stage, offload)
    arch = resolve_architecture(cfg, architecture)
    models = _meta_models(cfg, architecture)
    census = census_of_models(models)
    census.reference_model = _reference_census(cfg, models)
    per_pair = None
    if activations:
        feature_dtype = getattr(torch, cfg.cache.dtype) if cfg.cache.enabled else models.weight_dtype
        per_pair = activation_bytes(_activation_twin(models, par), 1, cfg.data.resolution, feature_dtype)
    settings = {
        **_config_settings(cfg, models, arch),
        "attention_backend": models.ip_unet.attention_backend,
        "unet_dtype": _dtype_name(models.unet.conv_in.weight.dtype),
    }
    plan = plan_from_census(
        census,
        par,
        optimizer=cfg.optim.optimizer,
        use_ema=cfg.optim.use_ema,
        cache_enabled=cfg.cache.enabled,
        activation_bytes_per_pair=per_pair,
        pairs_per_batch=cfg.data.pairs_per_batch,
        resolution=cfg.data.resolution,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        settings=settings,
    )
    if arch.note():
        plan.notes.insert(0, arch.note())
    return plan


def startup_plan(
    cfg: TrainConfig,
    models: PatchDPOModels,
    world_size: int = 1,
    reference_model: torch.nn.Module | None = None,
    activations: bool = True,
) -> MemoryPlan:
    """The plan of a starting run, from the real models' tensors (counted, not copied) before DeepSpeed wraps them.

    ``reference_model`` is the frozen reference the trainer built (``TrainableSetup.reference``). The activations
    are measured on a ``meta`` twin of the real policy (nothing is allocated on the device); if that fails, the plan
    goes without an activations line and says so in its notes.
    """
    par = parallelism_from_config(cfg, world_size)
    census = census_of_models(models, reference_model)
    per_pair, failed = None, None
    if activations:
        try:
            feature_dtype = getattr(torch, cfg.cache.dtype) if cfg.cache.enabled else models.weight_dtype
            twin = _activation_twin(models, par if par.low_precision is not None else Parallelism())
            per_pair = activation_bytes(twin, 1, cfg.data.resolution, feature_dtype)
        except Exception as exc:  # the plan is informative: never let it stop a run
            failed = f"activations not measured ({type(exc).__name__}: {exc})"
    plan = plan_from_census(
        census,
        par,
        optimizer=cfg.optim.optimizer,
        use_ema=cfg.optim.use_ema,
        cache_enabled=cfg.cache.enabled,
        activation_bytes_per_pair=per_pair,
        pairs_per_batch=cfg.data.pairs_per_batch,
        resolution=cfg.data.resolution,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        settings=_config_settings(cfg, models),
    )
    if failed:
        plan.notes.insert(0, failed)
    return plan


def log_startup_plan(cfg: TrainConfig, models: PatchDPOModels, world_size: int, reference_model: Any) -> None:
    """Log :func:`startup_plan` as one compact table (rank 0 calls it); a failure is logged, never raised."""
    try:
        plan = startup_plan(cfg, models, world_size, reference_model)
    except Exception as exc:  # an unexpected model layout must not stop training
        logger.warning("memory plan not available: %s: %s", type(exc).__name__, exc)
        return
    logger.info("%s", plan.summary())
    for note in plan.notes:
        if note.startswith("activations not measured"):  # the table goes without its activations line: say why
            logger.warning("memory plan: %s", note)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``patchdpo estimate-memory --config ...``: print the per-GPU memory plan of a training config.

    ``--world-size``, ``--zero-stage`` and ``--offload`` override the config's DeepSpeed settings; ``--variant
    KEY=VALUE[,KEY=VALUE...]`` (repeatable) adds a column for the config with those overrides; ``--all-modes`` a
    column per ``model.trainable`` mode. Bad input raises ``ValueError`` (one line through ``patchdpo``).
    """
    from patchdpo_fast.config import TRAINABLE_MODES, load_config

    parser = argparse.ArgumentParser(
        prog="patchdpo estimate-memory",
        description="Per-GPU memory of a training config (weights, gradients, optimizer, DPO reference, EMA, "
        "activations), built on the meta device: no weights read, nothing allocated.",
    )
    parser.add_argument("--config", default="configs/tiny_cpu.yaml", help="training YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")  # fmt: skip
    parser.add_argument("--world-size", type=int, default=None, metavar="N", help="number of GPUs (default 1)")
    parser.add_argument("--zero-stage", type=int, default=None, metavar="S",
                        help="DeepSpeed ZeRO stage 0-3 (default: the config's DeepSpeed settings)")  # fmt: skip
    parser.add_argument("--offload", default=None, metavar="WHAT",
                        help=f"DeepSpeed CPU offload: {', '.join(OFFLOAD_CHOICES)} (default: config)")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also account the config with these overrides, in another column")  # fmt: skip
    parser.add_argument("--architecture", default=None, metavar="ARCH",
                        help="base model while model.pretrained_path does not exist yet: sdxl (SDXL base 1.0) or sd15 "
                        "(Stable Diffusion 1.5), or auto (default: model.base_architecture; an existing folder's "
                        "UNet config decides)")  # fmt: skip
    parser.add_argument("--all-modes", action="store_true", help="a column per model.trainable mode")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    _parse_offload(args.offload)  # fail on a bad value before building anything
    if args.architecture is not None:
        _check_architecture_choice(args.architecture, "--architecture")
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size must be a positive integer (number of GPUs), got {args.world_size}")
    variants: dict[str, list[str]] = {"as configured": []}
    if args.all_modes:
        variants = {mode: [f"model.trainable={mode}", "model.train_resampler=false"] for mode in TRAINABLE_MODES}
    variants |= {v: [x.strip() for x in v.split(",") if x.strip()] for v in args.variant}
    plans: dict[str, MemoryPlan] = {}
    for name, extra in variants.items():
        cfg = load_config(args.config, [*args.overrides, *extra], check_paths=False)  # ConfigError: one line
        plans[name] = estimate_memory(cfg, world_size=args.world_size, zero_stage=args.zero_stage,
                                      offload=args.offload, architecture=args.architecture)  # fmt: skip
    if args.json:
        import json

        print(json.dumps({name: plan.to_dict() for name, plan in plans.items()}, indent=2))
        return 0
    models_seen: list[str] = []
    for plan in plans.values():
        s = plan.settings
        line = f"model: {s['model']}: {_parameters_line(s['parameters'])} params"
        if line not in models_seen:
            models_seen.append(line)
            print(line)
    for name, plan in plans.items():
        s = plan.settings
        per_pair = s.get("activation_bytes_per_pair", 0) / GIB
        print(f"{name}: {s['trainable']} {s['loss']}, {s['parallel']}, precision "
              f"{s['mixed_precision']}, {s['optimizer']}, {s['resolution']} px, {s['pairs_per_batch']} "
              f"pairs/micro-batch, gradient checkpointing {s['gradient_checkpointing']}, input cache "
              f"{s['cache_enabled']}, {per_pair:.3f} GiB activations/pair")  # fmt: skip
    print()
    print(compare_markdown(plans) if len(plans) > 1 else next(iter(plans.values())).to_markdown())
    notes = next(iter(plans.values())).notes
    if notes:
        print()
        for note in notes:
            print(f"* {note}")
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("estimate-memory", main))
