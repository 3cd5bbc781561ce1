"""IP-Adapter-Plus around a frozen diffusers ``UNet2DConditionModel``, with an optional DPO reference adapter.

:class:`IPAdapterUNet` is one ``nn.Module`` holding the (frozen) UNet with :class:`IPAttnProcessor` s installed in
its cross-attention layers and the trainable :class:`Resampler` (``image_proj``). With ``reference=True`` (what the
DPO losses need) it also holds the frozen reference adapter: a copy of every IP K/V projection and, when the
resampler trains, of the resampler (``ref_image_proj``). Wrap this module with accelerate / DeepSpeed; its
``forward`` predicts the noise.

File format (``export_ip_adapter`` / ``load_ip_adapter_weights``) is the one of the official IP-Adapter-Plus
checkpoints and of stock diffusers' ``load_ip_adapter``: ``image_proj.<resampler key>`` and
``ip_adapter.{k}.to_k_ip.weight`` / ``ip_adapter.{k}.to_v_ip.weight`` where ``k = 1, 3, 5, ...`` enumerates the
UNet's cross-attention processors in ``unet.attn_processors`` order (the odd positions of the original
processor list, in which self- and cross-attention alternate).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from patchdpo_fast.utils import tensors_sha256, write_safetensors

from .attention import AttnProcessor, IPAttnProcessor, resolve_backend
from .resampler import Resampler, resampler_config_from_state_dict

__all__ = [
    "IPAdapterUNet",
    "check_adapter_fits",
    "cross_attention_processor_names",
    "describe_unet",
    "read_ip_adapter_file",
    "unet_added_conditioning",
    "write_ip_adapter_file",
]


def cross_attention_processor_names(unet: nn.Module) -> list[str]:
    """Names (keys of ``unet.attn_processors``) of the layers that get an IP processor, in checkpoint order.

    Same rule as diffusers' IP-Adapter loader: every processor whose name does not end in ``attn1.processor``
    (and is not in a motion module).
    """
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor") and "motion_modules" not in n]


def unet_added_conditioning(unet: nn.Module) -> bool:
    """Whether the UNet takes SDXL's added conditioning (pooled text embedding + micro-conditioning time ids).

    Read from the UNet's own config: ``addition_embed_type == "text_time"`` (SDXL-class). ``None`` (SD1.5 / SD2-class:
    the text tokens are the only conditioning) gives False. Other addition types are not supported.

    Raises:
        ValueError: another ``addition_embed_type`` (``text``, ``image``, ``text_image``, ``image_hint``).
    """
    kind = getattr(unet.config, "addition_embed_type", None)
    if kind not in (None, "text_time"):
        raise ValueError(
            f"UNet addition_embed_type={kind!r} is not supported: SDXL-class UNets use 'text_time' (pooled text + time "
            "ids), SD1.5/SD2-class UNets none"
        )
    return kind == "text_time"


def describe_unet(unet: nn.Module) -> str:
    """The UNet's conditioning layout in words, from its config (for error messages)."""
    n = len(cross_attention_processor_names(unet))
    kind = (
        "SDXL-class: pooled text + time ids" if unet_added_conditioning(unet) else "SD1.5-class: no added conditioning"
    )
    return f"cross_attention_dim {unet.config.cross_attention_dim}, {n} cross-attention layers ({kind})"


def check_adapter_fits(groups: Mapping[str, Mapping[str, torch.Tensor]], unet: nn.Module, source: object) -> None:
    """Refuse an IP-Adapter made for another UNet layout before any tensor is copied, naming both layouts.

    Compares the adapter's output width (``image_proj.proj_out``), the text width its K/V projections read and its
    number of IP layers with the UNet's ``cross_attention_dim`` and cross-attention layers (an SDXL adapter has 2048
    and 70, an SD1.5 one 768 and 16).

    Raises:
        ValueError: the adapter does not fit; the message names the file, both layouts and what to use instead.
    """
    image_proj, ip_adapter = groups["image_proj"], groups["ip_adapter"]
    proj_out = image_proj.get("proj_out.weight")
    file_dim = int(proj_out.shape[0]) if proj_out is not None else None
    kv = [v for k, v in ip_adapter.items() if k.endswith("to_k_ip.weight")]
    kv_dims = sorted({int(v.shape[1]) for v in kv})
    file_layers = len(kv)
    cross_dim = int(unet.config.cross_attention_dim)
    layers = len(cross_attention_processor_names(unet))
    if file_dim in (None, cross_dim) and kv_dims in ([], [cross_dim]) and file_layers == layers:
        return
    family = {2048: " (the SDXL layout)", 768: " (the SD1.5 layout)"}.get(file_dim or -1, "")
    raise ValueError(
        f"IP-Adapter {source} does not fit this UNet: the adapter is laid out for cross_attention_dim {file_dim} "
        f"(its K/V projections read width {kv_dims or '?'}) with {file_layers} IP cross-attention layers{family}; "
        f"the UNet has {describe_unet(unet)}. Use the IP-Adapter made for this base model (e.g. "
        "ip-adapter-plus_sd15 for SD1.5, ip-adapter-plus_sdxl_vit-h for SDXL)"
    )


def _is_processor_key(name: str) -> bool:
    """Whether a UNet parameter/state-dict key belongs to an installed attention processor (our IP weights)."""
    return ".processor." in name


def _copy_strict(
    ours: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str, key_label: str
) -> None:
    """Copy ``state_dict`` into the tensors ``ours`` (strict: the same keys, matching shapes; no-grad caller)."""
    missing, unexpected = sorted(set(ours) - set(state_dict)), sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise KeyError(f"{what} state dict mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for key, target in ours.items():
        value = state_dict[key]
        if value.shape != target.shape:
            raise ValueError(f"{key_label} {key}: shape {tuple(value.shape)} != expected {tuple(target.shape)}")
        target.copy_(value)


def _attention_module(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name[: -len(".processor")])


def read_ip_adapter_file(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read an IP-Adapter file into ``{"image_proj": {...}, "ip_adapter": {...}}``.

    ``.safetensors`` files hold flat ``image_proj.*`` / ``ip_adapter.*`` keys. Any other suffix (the official
    ``.bin``) is read with ``torch.load(..., weights_only=True)`` (never unrestricted unpickling) and may be nested
    or flat.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IP-Adapter checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path), device="cpu")
    else:
        flat = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(flat, Mapping):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(flat).__name__}")
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        if key in out and isinstance(value, Mapping):
            out[key].update(value)
            continue
        group, _, rest = key.partition(".")
        if group in out and rest and isinstance(value, torch.Tensor):
            out[group][rest] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise ValueError(f"{path}: not an IP-Adapter checkpoint (needs 'image_proj' and 'ip_adapter' groups)")
    return out


def write_ip_adapter_file(
    path: str | os.PathLike,
    image_proj: Mapping[str, torch.Tensor],
    ip_adapter: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write ``image_proj.*`` and ``ip_adapter.*`` tensors atomically to one safetensors file.

    Args:
        path: target ``.safetensors`` file.
        image_proj, ip_adapter: the two groups of tensors (any device).
        dtype: cast the floating-point tensors on the way out: ``torch.float16`` (default, like the official
            IP-Adapter files: half the size of fp32), ``torch.bfloat16``, ``torch.float32``, or ``None`` to keep
            each tensor's dtype. Tensors are written one at a time, so the export holds at most one converted
            tensor, never a copy of the whole adapter.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {path}")
    tensors = {f"{prefix}.{key}": value for prefix, group in (("image_proj", image_proj), ("ip_adapter", ip_adapter))
               for key, value in group.items()}  # fmt: skip
    return write_safetensors(tensors, path, metadata={"format": "pt"}, dtype=dtype)


class IPAdapterUNet(nn.Module):
    """A frozen diffusers UNet with IP-Adapter-Plus processors, the resampler and (optionally) the reference adapter.

    The UNet may be SDXL-class (``addition_embed_type="text_time"``: pooled text + time ids) or SD1.5-class (no added
    conditioning); which one is read from its config (:func:`unet_added_conditioning`), never from a name.

    Args:
        unet: a diffusers ``UNet2DConditionModel``; its processors are replaced in place and its weights frozen.
        resampler: the ``image_proj`` resampler (kept in its own dtype, fp32 recommended). ``None`` builds the UNet
            without an IP-Adapter (``model.use_ip_adapter: false``: the text tokens are the only conditioning, every
            attention layer gets the plain processor; for training the UNet or a LoRA on it on plain preference
            pairs). ``image_features`` are then ignored and there is no adapter to export or load.
        train_resampler: train the resampler too (and, with ``reference``, keep a frozen reference copy of it).
        train_unet: also train the UNet's own weights (full finetuning, e.g. to pretrain a model from scratch). The
            reference adapter would then run on the *trained* UNet, so it is no DPO reference model: a forward with
            ``use_reference=True`` raises (the trainer keeps a separate frozen copy as the reference instead).
        train_adapter: train the IP K/V projections (and the resampler with ``train_resampler``); ``False`` keeps
            the adapter frozen, as when only the UNet (or a LoRA on it, :meth:`add_unet_lora`) trains. A frozen
            adapter is its own reference: ``use_reference=True`` then needs no reference copy.
        attention_backend: ``"sdpa"``, ``"xformers"`` or ``"eager"`` for every attention layer of the UNet.
        xformers_fallback: fall back to ``"sdpa"`` with a warning (True) or raise (False) if xformers is unusable.
        ip_scale: weight of the image branch in every IP processor.
        adapter_dtype: dtype of the IP K/V projections (fp32 master weights by default).
        reference: keep a frozen reference copy of the initial adapter, as the DPO losses need (``forward`` with
            ``use_reference=True``). The other losses never read it: ``False`` saves one adapter of memory
            (1.36 GB for SDXL in fp32). :meth:`enable_reference` / :meth:`disable_reference` change it later.

    The K/V projections start as copies of each layer's text ``to_k`` / ``to_v`` weights (as the original
    IP-Adapter training does); load pretrained adapter weights with :meth:`load_ip_adapter_weights`.
    """

    def __init__(
        self,
        unet: nn.Module,
        resampler: Resampler | None,
        train_resampler: bool = False,
        attention_backend: str = "sdpa",
        xformers_fallback: bool = True,
        ip_scale: float = 1.0,
        adapter_dtype: torch.dtype = torch.float32,
        train_unet: bool = False,
        reference: bool = True,
        train_adapter: bool = True,
    ) -> None:
        super().__init__()
        cross_dim = unet.config.cross_attention_dim
        if resampler is None and train_adapter:
            raise ValueError("train_adapter=True needs a resampler (an IP-Adapter to train)")
        if resampler is not None and resampler.config["output_dim"] != cross_dim:
            raise ValueError(
                f"resampler output_dim {resampler.config['output_dim']} != UNet cross_attention_dim {cross_dim} (the "
                f"UNet has {describe_unet(unet)})"
            )
        unet.requires_grad_(False)
        self.unet = unet
        self.image_proj = resampler
        self.train_resampler = train_resampler
        self.train_unet = train_unet
        self.train_adapter = bool(train_adapter)
        self.ref_image_proj: Resampler | None = None
        self._reference = bool(reference) and resampler is not None
        self._use_reference = False
        self._ip_names = cross_attention_processor_names(unet) if resampler is not None else []
        self._added_conditioning = unet_added_conditioning(unet)  # SDXL-class (pooled text + time ids) or SD1.5-class

        backend = resolve_backend(attention_backend, xformers_fallback)  # warn / raise once, not per layer
        self.attention_backend = backend
        plain = AttnProcessor(backend)
        processors: dict[str, object] = {}
        for name in unet.attn_processors:
            if name in self._ip_names:
                attn = _attention_module(unet, name)
                if not getattr(attn, "is_cross_attention", True):
                    raise ValueError(f"{name} is not a cross-attention layer")
                proc = IPAttnProcessor(
                    hidden_size=attn.to_k.out_features,
                    cross_attention_dim=attn.to_k.in_features,
                    num_tokens=resampler.num_queries,
                    scale=ip_scale,
                    backend=backend,
                    init_k=attn.to_k.weight.detach(),
                    init_v=attn.to_v.weight.detach(),
                    dtype=adapter_dtype,
                    device=attn.to_k.weight.device,
                    reference=self._reference,
                )
                processors[name] = proc
            else:
                processors[name] = plain
        unet.set_attn_processor(processors)
        self._set_trainable()

    # ------------------------------------------------------------------ structure
    @property
    def ip_processors(self) -> dict[str, IPAttnProcessor]:
        """The IP processors by ``unet.attn_processors`` name, in checkpoint order."""
        procs = self.unet.attn_processors
        return {name: procs[name] for name in self._ip_names}

    @property
    def num_ip_tokens(self) -> int:
        """Number of image-prompt tokens appended to the text tokens."""
        return 0 if self.image_proj is None else self.image_proj.num_queries

    @property
    def has_ip_adapter(self) -> bool:
        """Whether the UNet carries an IP-Adapter (``False``: built with ``resampler=None``)."""
        return self.image_proj is not None

    def _require_ip_adapter(self, what: str) -> None:
        if self.image_proj is None:
            raise RuntimeError(f"{what}: this model has no IP-Adapter (built with model.use_ip_adapter=false)")

    def _set_trainable(self) -> None:
        self.unet.requires_grad_(False)
        for proc in self.ip_processors.values():
            proc.to_k_ip.requires_grad_(self.train_adapter)
            proc.to_v_ip.requires_grad_(self.train_adapter)
            if proc.has_reference:
                proc.ref_k_ip.requires_grad_(False)
                proc.ref_v_ip.requires_grad_(False)
        if self.train_unet:
            for name, param in self.unet.named_parameters():
                if not _is_processor_key(name):
                    param.requires_grad_(True)
        for _, param in self.unet_lora_parameters():
            param.requires_grad_(True)
        if self.image_proj is not None:
            self.image_proj.requires_grad_(self.train_resampler and self.train_adapter)
        if self.train_resampler and self._reference:
            if self.ref_image_proj is None:
                self.ref_image_proj = copy.deepcopy(self.image_proj)
            self.ref_image_proj.requires_grad_(False)
        else:
            self.ref_image_proj = None

    # ------------------------------------------------------------------ UNet LoRA
    @property
    def has_unet_lora(self) -> bool:
        """Whether :meth:`add_unet_lora` put a LoRA on the UNet."""
        return bool(getattr(self.unet, "peft_config", None))

    def add_unet_lora(
        self,
        rank: int,
        alpha: float | None = None,
        target_modules: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        dropout: float = 0.0,
    ) -> None:
        """Put a trainable LoRA (peft, through diffusers' ``unet.add_adapter``) on the UNet's ``target_modules``.

        The IP processors keep calling the wrapped ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``, so the LoRA acts in
        every attention layer, the IP cross-attentions included; the IP-Adapter's own ``to_k_ip`` / ``to_v_ip`` are
        not LoRA targets. B starts at zero (the LoRA model equals the base UNet at step 0). The LoRA weights are fp32
        master weights whatever the UNet's dtype. ``use_reference=True`` runs the UNet with the LoRA switched off.
        """
        from peft import LoraConfig

        if self.has_unet_lora:
            raise RuntimeError("the UNet already has a LoRA")
        if self.train_unet:
            raise ValueError("a LoRA on a fully trained UNet makes no sense: choose one of train_unet and a LoRA")
        config = LoraConfig(
            r=int(rank),
            lora_alpha=float(rank if alpha is None else alpha),
            target_modules=list(target_modules),
            lora_dropout=float(dropout),
            init_lora_weights="gaussian",
        )
        try:
            self.unet.add_adapter(config)
        except ValueError as exc:  # peft: no module matched
            raise ValueError(f"model.lora.target_modules {list(target_modules)}: {exc}") from None
        for _, param in self.unet_lora_parameters():
            param.data = param.data.float()
        self._set_trainable()

    def unet_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the UNet LoRA's weights (names relative to the UNet); empty without a LoRA."""
        if not self.has_unet_lora:
            return []
        return [(n, p) for n, p in self.unet.named_parameters() if ".lora_" in n and not _is_processor_key(n)]

    def unet_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA's tensors (detached, not copied) keyed by their UNet parameter names (checkpoint format)."""
        return {n: p.detach() for n, p in self.unet_lora_parameters()}

    @torch.no_grad()
    def load_unet_lora_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`unet_lora_state_dict` output (strict: every key, matching shapes)."""
        _copy_strict(self.unet_lora_state_dict(), state_dict, "UNet LoRA", "LoRA")

    @contextlib.contextmanager
    def unet_lora_disabled(self) -> Iterator[None]:
        """Context manager: the UNet runs without its LoRA (the base UNet, bit for bit); a no-op without one.

        Uses diffusers' ``disable_adapters`` / ``enable_adapters`` (peft's adapter toggle), as diffusers' DPO example
        gets its reference model; the LoRA weights keep their ``requires_grad`` afterwards.
        """
        if not self.has_unet_lora:
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()
            for _, param in self.unet_lora_parameters():
                param.requires_grad_(True)

    def saved_parameters(self, whole_unet: bool = False) -> list[nn.Parameter]:
        """The parameters that checkpoints and exports read: the policy adapter (resampler and every IP
        ``to_k_ip``/``to_v_ip`` weight, trained or not), the UNet LoRA, and with ``whole_unet`` every UNet weight.

        Under ZeRO-3 only these need gathering to save; the frozen base UNet of the adapter and LoRA modes does not.
        """
        out: dict[int, nn.Parameter] = {}
        if whole_unet:
            out.update((id(p), p) for p in self.unet.parameters())
        if self.image_proj is not None:
            out.update((id(p), p) for p in self.image_proj.parameters())
            for proc in self.ip_processors.values():
                out.update((id(p), p) for p in (proc.to_k_ip.weight, proc.to_v_ip.weight))
        out.update((id(p), p) for _, p in self.unet_lora_parameters())
        return list(out.values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: every IP ``to_k_ip``/``to_v_ip`` weight, plus the resampler if enabled."""
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs of :meth:`trainable_parameters`."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def set_attention_backend(self, backend: str, xformers_fallback: bool = True) -> str:
        """Switch every attention layer of the UNet (plain and IP) to another backend; returns the one in use."""
        resolved = resolve_backend(backend, xformers_fallback)
        plain = AttnProcessor(resolved)
        for name in self.unet.attn_processors:
            if name in self._ip_names:
                proc = _attention_module(self.unet, name).processor
                proc.requested_backend = backend
                proc.backend = resolved
            else:
                _attention_module(self.unet, name).set_processor(plain)
        self.attention_backend = resolved
        return resolved

    def set_ip_scale(self, scale: float) -> None:
        """Set the image-branch weight of every IP processor."""
        for proc in self.ip_processors.values():
            proc.scale = scale

    def enable_gradient_checkpointing(self) -> None:
        """Turn on activation checkpointing in the UNet blocks (non-reentrant, so frozen inputs are fine)."""
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        """Turn activation checkpointing off again."""
        self.unet.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ reference
    @property
    def has_reference(self) -> bool:
        """Whether the frozen reference adapter exists (built for the DPO losses)."""
        return self._reference

    def enable_reference(self) -> None:
        """Build the frozen reference adapter as a copy of the current policy adapter (a no-op if it exists)."""
        if self._reference:
            return
        self._reference = True
        for proc in self.ip_processors.values():
            proc.enable_reference()
        self._set_trainable()

    def disable_reference(self) -> None:
        """Drop the reference adapter; ``use_reference=True`` then raises until :meth:`enable_reference`."""
        self._set_reference_flag(False)
        self._reference = False
        for proc in self.ip_processors.values():
            proc.disable_reference()
        self.ref_image_proj = None

    def _require_reference(self) -> None:
        if not self._reference:
            raise RuntimeError(
                "this IP-Adapter has no reference adapter: it is built only for the DPO losses (patch_dpo, "
                "diffusion_dpo); pass reference=True or call enable_reference()"
            )

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """The reference adapter's tensors (detached, not copied): ``ref_image_proj.*`` when the resampler trains and
        ``ip_adapter.{k}.ref_k_ip.weight`` / ``ref_v_ip.weight``; empty without a reference."""
        out: dict[str, torch.Tensor] = {}
        if self.ref_image_proj is not None:
            out.update({f"ref_image_proj.{k}": v.detach() for k, v in self.ref_image_proj.state_dict().items()})
        for i, proc in enumerate(self.ip_processors.values()):
            if proc.has_reference:
                for name in ("ref_k_ip", "ref_v_ip"):
                    out[f"ip_adapter.{2 * i + 1}.{name}.weight"] = getattr(proc, name).weight.detach()
        return out

    def reference_parameters(self) -> list[nn.Parameter]:
        """The frozen reference adapter's parameters (empty without a reference)."""
        params = [] if self.ref_image_proj is None else list(self.ref_image_proj.parameters())
        for proc in self.ip_processors.values():
            if proc.has_reference:
                params += [proc.ref_k_ip.weight, proc.ref_v_ip.weight]
        return params

    def reference_fingerprint(self) -> str | None:
        """SHA-256 of the reference adapter (names, dtypes, shapes and bytes of :meth:`reference_state_dict`).

        Checkpoints store it instead of the reference weights: the reference is the initial adapter, which a resumed
        run rebuilds from its configuration, and the fingerprint proves it rebuilt the same one. ``None`` without a
        reference. Tensors on an accelerator are brought to the host one at a time.
        """
        if not self._reference:
            return None
        return tensors_sha256(self.reference_state_dict())

    @torch.no_grad()
    def sync_reference(self) -> None:
        """Make the frozen reference adapter equal to the current (policy) adapter."""
        self._require_reference()
        for proc in self.ip_processors.values():
            proc.sync_reference()
        if self.ref_image_proj is not None:
            self.ref_image_proj.load_state_dict(self.image_proj.state_dict())

    @contextlib.contextmanager
    def reference_mode(self, enabled: bool = True) -> Iterator[None]:
        """Context manager: inside it, forward passes (and direct UNet calls) use the reference adapter."""
        if enabled:
            self._require_reference()
        previous = self._use_reference
        self._set_reference_flag(enabled)
        try:
            yield
        finally:
            self._set_reference_flag(previous)

    def _set_reference_flag(self, enabled: bool) -> None:
        self._use_reference = enabled
        for proc in self.ip_processors.values():
            proc.use_reference = enabled

    # ------------------------------------------------------------------ forward
    def ip_tokens(self, image_features: torch.Tensor, use_reference: bool = False) -> torch.Tensor:
        """Image-prompt tokens ``(B, num_ip_tokens, cross_attention_dim)`` from CLIP features ``(B, S, D)``."""
        self._require_ip_adapter("ip_tokens")
        proj = self.ref_image_proj if (use_reference and self.ref_image_proj is not None) else self.image_proj
        return proj(image_features)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        image_features: torch.Tensor,
        use_reference: bool | None = None,
    ) -> torch.Tensor:
        """Predict the noise ``eps`` (or ``v``, as the UNet was trained) for ``noisy_latents`` (same shape, in the
        UNet's dtype).

        Args:
            noisy_latents: ``(B, 4, h, w)``.
            timesteps: ``(B,)`` or a scalar.
            prompt_embeds: ``(B, T, cross_attention_dim)`` (see ``PatchDPOModels.encode_prompts``).
            pooled_prompt_embeds: ``(B, pooled_dim)`` for an SDXL-class UNet (``addition_embed_type="text_time"``);
                ignored (may be None) for an SD1.5-class UNet, which has no added conditioning.
            time_ids: ``(B, 6)`` SDXL micro-conditioning; ignored (may be None) for an SD1.5-class UNet.
            image_features: ``(B, S, D)`` CLIP vision penultimate hidden states.
            use_reference: run the frozen reference adapter (always without gradients); ``None`` means the
                current :meth:`reference_mode`.
        """
        if use_reference is None:
            use_reference = self._use_reference
        if use_reference and self.train_unet:
            raise RuntimeError(
                "the UNet trains (train_unet=True), so the reference adapter on it is not a frozen reference model; "
                "DPO losses are not available in this mode"
            )
        # the reference adapter: its frozen copy, or the adapter itself when it does not train
        ref_adapter = bool(use_reference) and (self._reference or self.train_adapter)
        if ref_adapter:
            self._require_reference()
        grad_ctx = torch.no_grad() if use_reference else contextlib.nullcontext()
        lora_ctx = self.unet_lora_disabled() if use_reference else contextlib.nullcontext()
        dtype = self.unet.conv_in.weight.dtype
        added = None
        if self._added_conditioning:
            if pooled_prompt_embeds is None or time_ids is None:
                raise ValueError("this SDXL-class UNet (addition_embed_type text_time) needs pooled_prompt_embeds and "
                                 "time_ids")  # fmt: skip
            added = {"text_embeds": pooled_prompt_embeds.to(dtype), "time_ids": time_ids.to(dtype)}
        with grad_ctx, lora_ctx:
            if self.image_proj is None:  # no IP-Adapter: the text tokens are the whole conditioning
                encoder_hidden_states, attn_kwargs = prompt_embeds.to(dtype), None
            else:
                tokens = self.ip_tokens(image_features, use_reference=ref_adapter)
                encoder_hidden_states = torch.cat([prompt_embeds.to(dtype), tokens.to(dtype)], dim=1)
                attn_kwargs = {"use_reference": ref_adapter}
            return self.unet(
                noisy_latents.to(dtype),
                timesteps,
                encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs=added,
                cross_attention_kwargs=attn_kwargs,
                return_dict=False,
            )[0]

    # ------------------------------------------------------------------ state dicts
    def ip_adapter_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The policy adapter as ``(image_proj, ip_adapter)`` groups in the official key layout."""
        self._require_ip_adapter("ip_adapter_state_dicts")
        image_proj = {k: v.detach() for k, v in self.image_proj.state_dict().items()}
        ip_adapter: dict[str, torch.Tensor] = {}
        for i, proc in enumerate(self.ip_processors.values()):
            k = 2 * i + 1
            ip_adapter[f"{k}.to_k_ip.weight"] = proc.to_k_ip.weight.detach()
            ip_adapter[f"{k}.to_v_ip.weight"] = proc.to_v_ip.weight.detach()
        return image_proj, ip_adapter

    def export_ip_adapter(self, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
        """Write the policy adapter as one safetensors file loadable by stock diffusers' ``load_ip_adapter``.

        Args:
            path: target ``.safetensors`` file (written atomically: temp file + ``os.replace``).
            dtype: dtype of the file: ``torch.float16`` (default, like the official files), ``torch.bfloat16``,
                ``torch.float32`` for the exact fp32 master weights, or ``None`` to keep each tensor's dtype.
                The tensors are converted one at a time (no copy of the whole adapter).
        """
        image_proj, ip_adapter = self.ip_adapter_state_dicts()
        return write_ip_adapter_file(path, image_proj, ip_adapter, dtype=dtype)

    @torch.no_grad()
    def load_ip_adapter_weights(
        self,
        source: str | os.PathLike | Mapping[str, Mapping[str, torch.Tensor]],
        update_reference: bool = True,
    ) -> None:
        """Load an IP-Adapter-Plus checkpoint (our export, or an official ``.bin`` / ``.safetensors``).

        Args:
            source: a file path or an already read ``{"image_proj": ..., "ip_adapter": ...}`` dict.
            update_reference: also make the frozen reference adapter (if there is one) equal to the loaded weights.
        """
        self._require_ip_adapter("load_ip_adapter_weights")
        groups = read_ip_adapter_file(source) if isinstance(source, (str, os.PathLike)) else source
        check_adapter_fits(groups, self.unet, source if isinstance(source, (str, os.PathLike)) else "(state dict)")
        image_proj = dict(groups["image_proj"])
        ip_adapter = dict(groups["ip_adapter"])
        found = resampler_config_from_state_dict(image_proj, dim_head=self.image_proj.config["dim_head"])
        mismatched = {k: (v, found[k]) for k, v in self.image_proj.config.items() if found[k] != v}
        if mismatched:
            raise ValueError(
                f"IP-Adapter image_proj does not match this resampler: {{name: (ours, file)}} = {mismatched}"
            )
        self.image_proj.load_state_dict(image_proj, strict=True)
        procs = list(self.ip_processors.values())
        expected = {f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(len(procs)) for kv in ("k", "v")}
        missing = sorted(expected - set(ip_adapter))
        unexpected = sorted(set(ip_adapter) - expected)
        if missing or unexpected:
            raise ValueError(
                f"IP-Adapter ip_adapter keys do not match this UNet ({len(procs)} cross-attention layers): "
                f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
            )
        for i, proc in enumerate(procs):
            k = 2 * i + 1
            for name, target in (("k", proc.to_k_ip), ("v", proc.to_v_ip)):
                value = ip_adapter[f"{k}.to_{name}_ip.weight"]
                if value.shape != target.weight.shape:
                    raise ValueError(
                        f"ip_adapter.{k}.to_{name}_ip.weight has shape {tuple(value.shape)}, "
                        f"expected {tuple(target.weight.shape)}"
                    )
                target.weight.copy_(value)
        if update_reference and self._reference:
            self.sync_reference()

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's own weights (detached), without the IP processors': the keys of a stock diffusers UNet."""
        return {k: v.detach() for k, v in self.unet.state_dict().items() if not _is_processor_key(k)}

    @torch.no_grad()
    def load_unet_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`unet_state_dict` output (strict: every key, matching shapes)."""
        _copy_strict(self.unet_state_dict(), state_dict, "UNet", "unet")

    def export_unet(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the UNet as a stock diffusers ``unet/`` folder (``config.json`` + safetensors weights).

        The IP processors are left out (they go into the IP-Adapter file), so
        ``UNet2DConditionModel.from_pretrained(folder)`` loads it without warnings. The folder is written next to
        its final place and renamed into it, replacing an older export.
        """
        from patchdpo_fast.utils import atomic_write_dir, set_default_permissions

        tensors = {k: v.to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.unet_state_dict().items()}

        def write(tmp: Path) -> None:
            from safetensors.torch import save_file

            self.unet.save_config(tmp)
            save_file(tensors, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
            set_default_permissions(tmp / "diffusion_pytorch_model.safetensors")  # safetensors writes 0600

        return atomic_write_dir(folder, write)

    def adapter_state_dict(self, include_reference: bool = False) -> dict[str, torch.Tensor]:
        """Training checkpoint of the adapter: the policy weights (tensors only, detached, not copied).

        Keys: ``image_proj.*`` and ``ip_adapter.{k}.{to_k_ip,to_v_ip}.weight``. The reference adapter is the initial
        adapter and is left out (checkpoints record its :meth:`reference_fingerprint`); ``include_reference`` adds
        :meth:`reference_state_dict`'s keys.
        """
        if self.image_proj is None:  # no IP-Adapter: nothing of it to checkpoint
            return {}
        out = {f"image_proj.{k}": v.detach() for k, v in self.image_proj.state_dict().items()}
        for i, proc in enumerate(self.ip_processors.values()):
            k = 2 * i + 1
            for name in ("to_k_ip", "to_v_ip"):
                out[f"ip_adapter.{k}.{name}.weight"] = getattr(proc, name).weight.detach()
        if include_reference:
            out.update(self.reference_state_dict())
        return out

    @torch.no_grad()
    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> bool:
        """Load :meth:`adapter_state_dict` output.

        Reference keys (``ref_image_proj.*``, ``*.ref_k_ip.weight``, ``*.ref_v_ip.weight``, as checkpoints before
        the reference was left out stored them) are loaded into the reference adapter when there is one and
        ignored otherwise. With ``strict``, missing policy keys and unknown keys raise ``KeyError``.

        Returns:
            Whether reference weights were loaded.
        """
        ours = self.adapter_state_dict()
        reference = self.reference_state_dict()
        ref_suffixes = (".ref_k_ip.weight", ".ref_v_ip.weight")
        is_ref = [k for k in state_dict if k.startswith("ref_image_proj.") or k.endswith(ref_suffixes)]
        missing = sorted(set(ours) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(ours) - set(is_ref))
        if strict and (missing or unexpected):
            raise KeyError(f"adapter state dict mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
        loaded_reference = False
        for key, target in (*ours.items(), *reference.items()):
            if key not in state_dict:
                continue
            value = state_dict[key]
            if value.shape != target.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} != expected {tuple(target.shape)}")
            target.copy_(value)
            loaded_reference |= key in reference
        return loaded_reference
