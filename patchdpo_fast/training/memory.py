"""Memory accounting of a PatchDPO training step, from the library's own objects, at any scale.

Two tools, and a plan built from them:

* :class:`AllocationTracker` watches every tensor operation (a ``TorchDispatchMode``) and records the storages that
  the operations create, with their sizes, for as long as they stay alive. It measures what a piece of code
  allocates and still holds afterwards (e.g. the activations a forward pass keeps for the backward pass) and its
  peak. It works the same on the ``meta`` device, where tensors have shapes and dtypes but no memory, so the
  figures of an SDXL-size model come from running it on ``meta`` without any weights.
* :func:`tensor_bytes` sums the distinct storages of tensors (weights, optimizer states).

:func:`memory_plan` accounts one training process's memory from a :class:`~patchdpo_fast.models.PatchDPOModels`
(resident frozen weights, encoders, trainable adapter, gradients, optimizer state materialized by the configured
optimizer itself, the DPO reference adapter when there is one, and the activations of one policy forward).
:func:`estimate_memory` builds the configured models on the ``meta`` device first, so it needs no weights and no
memory: ``python -m patchdpo_fast.training.memory --config configs/sdxl_ipadapter_plus.yaml`` prints the table
that the README shows. The figures are per process without ZeRO sharding (ZeRO-1/2 divide the optimizer state and
gradients by the number of ranks); they leave out the CUDA context, allocator caching and fragmentation, and the
short-lived tensors of a step (the loss, the no-grad reference forward, a checkpointed block's recomputation).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    "AllocationTracker",
    "MemoryItem",
    "MemoryPlan",
    "activation_bytes",
    "compare_markdown",
    "estimate_memory",
    "memory_plan",
    "optimizer_state_bytes",
    "tensor_bytes",
]

GIB = 1024**3


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


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryItem:
    """One line of a :class:`MemoryPlan`: ``bytes`` held by ``name``; ``resident`` if it counts in the total."""

    name: str
    bytes: int
    detail: str
    resident: bool = True


@dataclass
class MemoryPlan:
    """Memory of one training process, item by item (see :func:`memory_plan`)."""

    items: list[MemoryItem]
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MemoryItem:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(f"no memory item {name!r}; items: {[i.name for i in self.items]}")

    @property
    def total_bytes(self) -> int:
        """Sum of the resident items: weights, adapter, gradients, optimizer, reference and activations."""
        return sum(item.bytes for item in self.items if item.resident)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: settings, items and the total."""
        return {
            "settings": dict(self.settings),
            "items": [vars(item) for item in self.items],
            "total_bytes": self.total_bytes,
        }

    def to_markdown(self) -> str:
        """A markdown table (GiB with three decimals)."""
        lines = ["| item | GiB | what |", "| --- | ---: | --- |"]
        for item in self.items:
            gib = f"{item.bytes / GIB:.3f}" if item.resident else f"({item.bytes / GIB:.3f})"
            lines.append(f"| {item.name} | {gib} | {item.detail} |")
        lines.append(f"| **total** | **{self.total_bytes / GIB:.3f}** | resident items; (..) not counted |")
        return "\n".join(lines)


def compare_markdown(plans: dict[str, MemoryPlan]) -> str:
    """Several plans side by side as one markdown table (GiB, three decimals): a column per plan, a row per item.

    Items a plan does not count in its total are shown in parentheses; rows follow the first plan's order.
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
    return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _params(numel: int) -> str:
    return f"{numel / 1e9:.3f} B params" if numel >= 1e8 else f"{numel / 1e6:.2f} M params"


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
    pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
    proj = models.image_proj.config
    if models.image_encoder is not None:
        enc = models.image_encoder.config
        tokens = (int(enc.image_size) // int(enc.patch_size)) ** 2 + 1
    else:  # released: IP-Adapter-Plus SDXL's ViT-H/14 at 224 px
        tokens = 257
    return (
        torch.zeros(images, int(cfg.in_channels), latent, latent, device=dev),
        torch.zeros(images, dtype=torch.long, device=dev),
        torch.zeros(images, 77, int(cfg.cross_attention_dim), dtype=feature_dtype, device=dev),
        torch.zeros(images, pooled_dim, dtype=feature_dtype, device=dev),
        torch.zeros(images, 6, device=dev),
        torch.zeros(images, tokens, int(proj["embedding_dim"]), dtype=feature_dtype, device=dev),
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


def memory_plan(
    models: PatchDPOModels,
    *,
    optimizer: str = "adamw",
    pairs_per_batch: int = 1,
    resolution: int = 512,
    cache_enabled: bool = True,
    cache_dtype: torch.dtype = torch.float32,
    activations: bool = True,
) -> MemoryPlan:
    """Account the memory of one single-process training step of ``models`` (meta or real).

    Items, each measured on the objects themselves:

    * ``frozen UNet``: the UNet's weights and buffers without the adapter layers, in their dtype;
    * ``frozen resampler`` (when the resampler does not train): the image-projection weights;
    * ``encoders``: VAE, both text encoders and the image encoder; not resident when ``cache_enabled`` (the
      trainer releases them once the input cache is built, see ``patchdpo_fast.train``);
    * ``trainable adapter``, ``gradients``: the trainable parameters and one gradient of the same dtype each;
    * ``optimizer state``: :func:`optimizer_state_bytes` of the trainable parameters for ``optimizer``;
    * ``DPO reference``: the frozen reference adapter; the trainer builds it only for the DPO losses, so it is
      whatever ``models`` holds (0 without one);
    * ``activations``: :func:`activation_bytes` of one pair, times ``pairs_per_batch``.

    Args:
        models: the bundle (e.g. built on ``meta`` by :func:`estimate_memory`).
        optimizer: ``adamw`` or ``adamw8bit``.
        pairs_per_batch: pairs per micro-batch (``data.pairs_per_batch``).
        resolution: training resolution in pixels.
        cache_enabled: whether the input cache serves the inputs (``cache.enabled``).
        cache_dtype: dtype of the cached features fed to the UNet (``cache.dtype``).
        activations: measure the activations (one forward pass; free on ``meta``).
    """
    ip_unet = models.ip_unet
    adapter_ids = {id(p) for p in ip_unet.trainable_parameters()}
    reference = list(ip_unet.reference_parameters()) if hasattr(ip_unet, "reference_parameters") else []
    reference_ids = {id(p) for p in reference}
    unet_frozen = [
        t
        for name, t in (*models.unet.named_parameters(), *models.unet.named_buffers())
        if ".processor." not in name and id(t) not in adapter_ids
    ]
    unet_numel = sum(t.numel() for t in unet_frozen)
    unet_dtype = models.unet.conv_in.weight.dtype
    trainable = ip_unet.trainable_parameters()
    n_train = sum(p.numel() for p in trainable)
    train_dtype = trainable[0].dtype if trainable else torch.float32
    items = [
        MemoryItem("frozen UNet", tensor_bytes(unet_frozen), f"{_params(unet_numel)}, {_dtype_name(unet_dtype)}"),
    ]
    if not ip_unet.train_resampler:
        proj = list(ip_unet.image_proj.parameters())
        items.append(MemoryItem("frozen resampler", tensor_bytes(proj),
                                f"{_params(sum(p.numel() for p in proj))}, {_dtype_name(proj[0].dtype)}"))  # fmt: skip
    encoders = [m for m in (models.vae, models.text_encoder, models.text_encoder_2, models.image_encoder) if m]
    enc_tensors = [t for m in encoders for t in (*m.parameters(), *m.buffers())]
    enc_detail = (
        "VAE + 2 text encoders + image encoder; released once the input cache is built"
        if cache_enabled
        else "VAE + 2 text encoders + image encoder, run every step (no input cache)"
    )
    items.append(MemoryItem("encoders", tensor_bytes(enc_tensors), enc_detail, resident=not cache_enabled))
    what = "IP K/V projections" + (" + resampler" if ip_unet.train_resampler else "")
    items.append(MemoryItem("trainable adapter", tensor_bytes(trainable),
                            f"{what}: {_params(n_train)}, {_dtype_name(train_dtype)}"))  # fmt: skip
    items.append(MemoryItem("gradients", n_train * train_dtype.itemsize, f"one per trainable weight, "
                            f"{_dtype_name(train_dtype)}"))  # fmt: skip
    items.append(MemoryItem("optimizer state", optimizer_state_bytes(trainable, optimizer),
                            {"adamw": "AdamW: 2 fp32 moments per weight",
                             "adamw8bit": "bitsandbytes AdamW8bit: 2 blockwise 8-bit moments per weight"}.get(
                                optimizer, optimizer)))  # fmt: skip
    ref_numel = sum(p.numel() for p in reference)
    items.append(MemoryItem("DPO reference", tensor_bytes(reference),
                            f"frozen copy of the initial adapter: {_params(ref_numel)}" if reference_ids
                            else "none: only patch_dpo / diffusion_dpo build it"))  # fmt: skip
    settings = {
        "optimizer": optimizer,
        "pairs_per_batch": pairs_per_batch,
        "resolution": resolution,
        "cache_enabled": cache_enabled,
        "gradient_checkpointing": bool(getattr(models.unet, "is_gradient_checkpointing", False)),
        "attention_backend": ip_unet.attention_backend,
        "unet_dtype": _dtype_name(unet_dtype),
    }
    if activations:
        per_pair = activation_bytes(models, 1, resolution, cache_dtype if cache_enabled else models.weight_dtype)
        settings["activation_bytes_per_pair"] = per_pair
        ckpt = "with" if settings["gradient_checkpointing"] else "without"
        items.append(MemoryItem(f"activations ({pairs_per_batch} pairs)", per_pair * pairs_per_batch,
                                f"{per_pair / GIB:.3f} GiB per pair at {resolution} px, {ckpt} gradient "
                                "checkpointing"))  # fmt: skip
    return MemoryPlan(items, settings)


def _meta_models(cfg: TrainConfig) -> PatchDPOModels:
    """The configured models built on the ``meta`` device: shapes and dtypes only, no weights read."""
    from patchdpo_fast.models.sdxl_config import SDXL_RESAMPLER, assemble_models, build_sdxl_components
    from patchdpo_fast.models.tiny import TINY_RESAMPLER, build_tiny_components

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    m = cfg.model
    if m.tiny:
        with torch.device("meta"):
            components = build_tiny_components(m.tiny_seed)
        for name in ("unet", "text_encoder", "text_encoder_2", "image_encoder"):
            components[name].to(dtype)
        resampler = TINY_RESAMPLER
    else:  # the SDXL base architecture (what pretrained_path holds for the paper's recipe)
        components = build_sdxl_components("meta", dtype)
        resampler = SDXL_RESAMPLER
    backend = "sdpa" if m.attention_backend == "xformers" else m.attention_backend  # same memory class
    return assemble_models(
        components,
        weight_dtype=dtype,
        seed=m.tiny_seed,
        train_resampler=m.train_resampler,
        attention_backend=backend,
        ip_scale=m.ip_scale,
        num_ip_tokens=m.num_ip_tokens,
        resampler=dict(resampler),
        gradient_checkpointing=m.gradient_checkpointing,
        reference=cfg.loss.uses_reference_model,
    )


def estimate_memory(cfg: TrainConfig, *, activations: bool = True) -> MemoryPlan:
    """:func:`memory_plan` of the models ``cfg`` describes, built on the ``meta`` device (no weights, no memory).

    ``model.tiny: false`` is accounted with the SDXL base architecture (``patchdpo_fast.models.sdxl_config``) and
    the IP-Adapter-Plus SDXL resampler; the DPO reference is included exactly when ``loss.type`` needs it.
    """
    models = _meta_models(cfg)
    plan = memory_plan(
        models,
        optimizer=cfg.optim.optimizer,
        pairs_per_batch=cfg.data.pairs_per_batch,
        resolution=cfg.data.resolution,
        cache_enabled=cfg.cache.enabled,
        cache_dtype=getattr(torch, cfg.cache.dtype),
        activations=activations,
    )
    plan.settings["loss"] = cfg.loss.type
    plan.settings["model"] = "tiny" if cfg.model.tiny else "SDXL"
    return plan


def main(argv: list[str] | None = None) -> int:
    """``python -m patchdpo_fast.training.memory --config ...``: print the memory table of a training config.

    ``--variant KEY=VALUE[,KEY=VALUE...]`` (repeatable) adds a column for the config with those overrides too.
    """
    from patchdpo_fast.config import ConfigError, load_config

    parser = argparse.ArgumentParser(
        prog="python -m patchdpo_fast.training.memory",
        description="Memory of one training process from a config, built on the meta device (no weights read).",
    )
    parser.add_argument("--config", default="configs/tiny_cpu.yaml", help="training YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also account the config with these overrides, in another column")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    variants = {"as configured": []} | {v: [x.strip() for x in v.split(",") if x.strip()] for v in args.variant}
    plans: dict[str, MemoryPlan] = {}
    for name, extra in variants.items():
        try:
            cfg = load_config(args.config, [*args.overrides, *extra], check_paths=False)
        except ConfigError as exc:
            print(f"memory: {exc}", file=sys.stderr)
            return 2
        plans[name] = estimate_memory(cfg)
    if args.json:
        import json

        print(json.dumps({name: plan.to_dict() for name, plan in plans.items()}, indent=2))
        return 0
    for name, plan in plans.items():
        s = plan.settings
        per_pair = s["activation_bytes_per_pair"] / GIB
        print(f"{name}: {s['model']} {s['loss']}, {s['resolution']} px, {s['pairs_per_batch']} pairs/micro-batch, "
              f"UNet {s['unet_dtype']}, {s['optimizer']}, gradient checkpointing {s['gradient_checkpointing']}, "
              f"input cache {s['cache_enabled']}, {per_pair:.3f} GiB activations/pair")  # fmt: skip
    print()
    print(compare_markdown(plans) if len(plans) > 1 else next(iter(plans.values())).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
