"""Training-step benchmark: this library's PatchDPO recipe against the official recipe, side by side in one process.

Two scales from the same code:

* ``sdxl`` (CUDA): a randomly initialized SDXL-shaped stack (:func:`patchdpo_fast.models.sdxl_config`), 512 px,
  ``pairs`` pairs (2 x pairs images) per step. The frozen UNet and the encoders are built once and shared by every
  recipe; a recipe only switches their dtypes and installs a fresh adapter (new IP processors, new optimizer).
* ``tiny`` (any device, the CPU default): the tiny random model of ``configs/tiny_cpu.yaml`` at 64 px, everything
  fp32. It checks the plumbing and runs everywhere; its numbers say nothing about a GPU.

Recipes (``RECIPES``):

* ``official`` – what PatchDPO's ``train_patchdpo.py`` does per step under ``accelerate --mixed_precision fp16``:
  the UNet keeps fp32 weights (the script's ``unet.to(weight_dtype)`` is commented out) and runs under fp16
  autocast; the VAE runs in fp32 (``latent_dist.mean``) on both images of every pair; both text encoders and the
  CLIP image encoder run in fp16; no input cache, no gradient checkpointing, no gradient clipping; loss
  ``mean(W * (pred.float() - noise.float())**2)`` in plain PyTorch with ``W = cat[1 - q_ref, q_gen]``; fp16
  ``GradScaler``; ``torch.optim.AdamW`` on the fp32 IP K/V weights; ``cudnn.deterministic = True`` (its ``set_seed``).
  Image preprocessing and tokenization happen in its DataLoader workers, so they are done before the timed loop.
  The library builds a frozen reference copy of the adapter only for the DPO losses; the official code has none,
  so the official recipes never get one (the baseline's memory is not inflated).
* ``official+fp16w`` – the same with the UNet weights cast to fp16 and cuDNN defaults: a stronger baseline
  (what the brief of the benchmark described); CUDA only.
* ``ours`` and variants – the trainer's own step (``patchdpo_fast.training``: ``ModelInputs`` reading the input cache,
  ``draw_pair_noise``, ``forward_loss`` with the fused ``patch_weighted_mse``, ``PlainEngine`` with the SDXL
  recipe's AdamW and grad-norm clipping) with the bf16 frozen UNet and encoders, SDPA attention, inputs read from
  a real input cache built once before the timed loop; ``+ckpt`` adds gradient checkpointing, ``+8bit``
  bitsandbytes AdamW8bit.

Data: the procedural pair set of the library at the benchmark's resolution. Batches are collated once before the
timed loop (for both recipes: a real run overlaps loading with DataLoader workers) and hold CPU tensors, so each
timed step includes the host-to-device copies. Timing is CUDA-synchronized per step; the medians over the timed
steps are reported. Peak memory is ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` from a reset
right before the recipe's first warm-up step (so it includes the resident weights, the optimizer state created at
the first step and the activations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bench_common as bc  # makes patchdpo_fast importable from an uninstalled checkout
import torch

REPO = bc.REPO
GIB = 1024**3

#: DESIGN.md section 4 (FlopCounterMode on the meta-device SDXL UNet, 77 text + 16 IP tokens, 512 px / 64x64 latent).
DESIGN_FWD_FLOPS_512 = 1.60e12
DESIGN_FWD_BWD_FLOPS_512 = 3.19e12  # frozen UNet: activation gradients only
H200_BF16_EXPECTED = 790e12
TARGET_SPEEDUP = 2.0
TARGET_MEMORY_RATIO = 0.5
CPU_MEMORY_REASON = "CPU run: peak memory is torch.cuda.max_memory_allocated, which needs CUDA"


@dataclass(frozen=True)
class Recipe:
    """One training recipe; dtypes apply on CUDA (the tiny CPU scale runs everything in fp32)."""

    name: str
    kind: str  # "official" or "ours"
    summary: str
    unet_dtype: torch.dtype
    encoder_dtype: torch.dtype
    autocast: torch.dtype | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    cudnn_deterministic: bool = False
    sdxl_only: bool = False


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "official",
        "official",
        "per-step VAE (fp32) + text/image encoders (fp16), fp32 UNet under fp16 autocast, "
        "GradScaler, torch AdamW, plain-PyTorch weighted MSE, no cache, no checkpointing",
        torch.float32,
        torch.float16,
        autocast=torch.float16,
        cudnn_deterministic=True,
    ),
    Recipe(
        "ours",
        "ours",
        "input cache, bf16 frozen UNet + encoders, fused patch_weighted_mse, SDPA, torch AdamW",
        torch.bfloat16,
        torch.bfloat16,
    ),
    Recipe(
        "ours+ckpt+8bit",
        "ours",
        "ours + gradient checkpointing + bitsandbytes AdamW8bit",
        torch.bfloat16,
        torch.bfloat16,
        gradient_checkpointing=True,
        optimizer="adamw8bit",
    ),
    Recipe(
        "ours+ckpt",
        "ours",
        "ours + gradient checkpointing",
        torch.bfloat16,
        torch.bfloat16,
        gradient_checkpointing=True,
    ),
    Recipe("ours+8bit", "ours", "ours + bitsandbytes AdamW8bit", torch.bfloat16, torch.bfloat16, optimizer="adamw8bit"),
    Recipe(
        "official+fp16w",
        "official",
        "official with fp16 UNet weights and cuDNN defaults (a stronger baseline)",
        torch.float16,
        torch.float16,
        autocast=torch.float16,
        sdxl_only=True,
    ),
)
RECIPE_NAMES = tuple(r.name for r in RECIPES)


@dataclass(frozen=True)
class Plan:
    scale: str  # "sdxl" or "tiny"
    warmup: int
    steps: int
    pairs: int


def default_plan(device: torch.device, scale: str, quick: bool) -> Plan:
    if device.type == "cuda":
        return Plan(scale, warmup=2 if quick else 3, steps=3 if quick else 8, pairs=4)
    return Plan(scale, warmup=1 if quick else 2, steps=2 if quick else 5, pairs=4)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _dt(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_matmul_rate(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """Dense matmul FLOP/s measured now: bf16 8192^3 on CUDA (the MFU denominator), fp32 on the CPU."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10 if quick else 25
    else:
        n, dtype, reps = (512 if quick else 1024), torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        times.append((time.perf_counter() - t0) / reps)
    per_call = min(times)
    del a, b
    _free(device)
    return {"n": n, "dtype": _dt(dtype), "seconds_per_matmul": per_call, "flops_per_s": 2 * n**3 / per_call}


def _clip_preprocess(pixels: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Square images in [0, 1] -> CLIP input (resize to ``size``, normalize): the official DataLoader's work."""
    import torch.nn.functional as F

    x = pixels.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


@contextlib.contextmanager
def _quiet_diffusers() -> Any:
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ---------------------------------------------------------------------------------------------------------------
# Context: models, data and config shared by the recipes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    plan: Plan
    cfg: Any  # TrainConfig of the library's recipe at this scale
    env: Any  # DistEnv (single process)
    base: Any  # PatchDPOModels holding the shared components
    tmp: Path
    loss_backend: str
    raw_batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    cache_batches: list[dict[str, Any]] | None = None
    cached: Any = None  # CachedPairDataset
    cache_build_s: float | None = None
    flops: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sdxl(self) -> bool:
        """SDXL scale (CUDA): the recipes' dtypes, autocast and cuDNN settings apply; tiny runs all-fp32."""
        return self.plan.scale == "sdxl"


def _load_cfg(scale: str, tmp: Path, pairs: int, loss_backend: str) -> Any:
    from patchdpo_fast.config import load_config

    common = [
        "data.source=procedural",
        f"data.pairs_per_batch={pairs}",
        f"data.procedural.num_pairs={2 * pairs}",
        "data.num_workers=0",
        f"cache.dir={tmp / 'cache'}",
        "cache.on_stale=rebuild",
        f"train.output_dir={tmp / 'run'}",
        "train.resume_from=null",
        "deepspeed.config=null",
        f"loss.backend={loss_backend}",
    ]
    if scale == "sdxl":
        return load_config(REPO / "configs" / "sdxl_ipadapter_plus.yaml", common, check_paths=False)
    # The tiny demo config, switched to the official loss (the demo trains patch_dpo) and fp32.
    return load_config(REPO / "configs" / "tiny_cpu.yaml", [*common, "loss.type=patch_weighted_mse"], check_paths=False)


def build_context(device: torch.device, plan: Plan, tmp: Path, loss_backend: str = "auto") -> Context:
    """Config, shared models and the official recipe's pre-collated raw batches."""
    from patchdpo_fast.data import build_pair_dataset
    from patchdpo_fast.training.build import build_models as _build_models
    from patchdpo_fast.training.distributed import DistEnv
    from patchdpo_fast.training.inputs import collate as _collate

    cfg = _load_cfg(plan.scale, tmp, plan.pairs, loss_backend)
    env = DistEnv(0, 0, 1, device, None)
    if plan.scale == "sdxl":
        from patchdpo_fast.models.sdxl_config import assemble_models, build_sdxl_components

        m = cfg.model
        # fp32 first: the official recipe's UNet is fp32; each recipe casts what it needs.
        components = build_sdxl_components(device, torch.float32, seed=0)
        base = assemble_models(
            components,
            weight_dtype=torch.float32,
            attention_backend=m.attention_backend,
            xformers_fallback=m.xformers_fallback,
            ip_scale=m.ip_scale,
            num_ip_tokens=m.num_ip_tokens,
            train_resampler=m.train_resampler,
            reference=cfg.loss.uses_reference_model,
        )
    else:
        base = _build_models(cfg, env)  # exactly the trainer's builder (tiny, fp32)
    ctx = Context(device, plan, cfg, env, base, tmp, loss_backend)

    raw = build_pair_dataset(cfg.data)
    size = base.image_size
    for start in range(0, 2 * plan.pairs, plan.pairs):
        b = _collate([raw[i] for i in range(start, start + plan.pairs)])
        ctx.raw_batches.append(
            {
                "images": torch.cat([b["ref_pixels"], b["gen_pixels"]]) * 2 - 1,  # (2B, 3, H, W) in [-1, 1]
                "clip": _clip_preprocess(b["ref_pixels"], size, base.image_mean, base.image_std),
                "ids": _token_ids(base.tokenizer, b["prompt"]),
                "ids_2": _token_ids(base.tokenizer_2, b["prompt"]),
                "q_ref": b["q_ref"],
                "q_gen": b["q_gen"],
            }
        )
    return ctx


def _ensure_cache(ctx: Context, models: Any) -> None:
    """Build the input cache once, with the library's own code and the recipe's encoders (outside the timed loop)."""
    if ctx.cache_batches is not None:
        return
    from patchdpo_fast.training.inputs import build_data as _build_data
    from patchdpo_fast.training.inputs import collate as _collate

    t0 = time.perf_counter()
    with torch.no_grad():
        dataset, cached = _build_data(ctx.cfg, models, ctx.env)
    _sync(ctx.device)
    ctx.cache_build_s = time.perf_counter() - t0
    p = ctx.plan.pairs
    ctx.cached = cached
    ctx.cache_batches = [_collate([dataset[i] for i in range(s, s + p)]) for s in range(0, 2 * p, p)]


# ---------------------------------------------------------------------------------------------------------------
# Recipe set-up and steps
# ---------------------------------------------------------------------------------------------------------------


def _recipe_models(ctx: Context, recipe: Recipe) -> Any:
    """Switch the shared components to the recipe's dtypes and install a fresh adapter on the shared UNet."""
    from patchdpo_fast.models.ip_adapter import IPAdapterUNet

    base, m = ctx.base, ctx.cfg.model
    unet = base.unet
    if ctx.sdxl:
        with _quiet_diffusers():  # its "modules to keep in float32: []" notice on every cast
            unet.to(recipe.unet_dtype)  # the old adapter is cast too, but it is replaced right below
        for enc in (base.text_encoder, base.text_encoder_2, base.image_encoder):
            enc.to(recipe.encoder_dtype)
        weight_dtype = recipe.unet_dtype
    else:
        weight_dtype = base.weight_dtype
    with ctx.device:
        ip_unet = IPAdapterUNet(
            unet,
            base.image_proj,
            train_resampler=m.train_resampler,
            attention_backend=m.attention_backend,
            xformers_fallback=m.xformers_fallback,
            ip_scale=m.ip_scale,
            # as the trainer: a reference adapter only for the DPO losses (the official code has none)
            reference=recipe.kind == "ours" and ctx.cfg.loss.uses_reference_model,
        )
    ip_unet.eval()
    if recipe.gradient_checkpointing:
        ip_unet.enable_gradient_checkpointing()
    else:
        ip_unet.disable_gradient_checkpointing()
    return dataclasses.replace(base, ip_unet=ip_unet, weight_dtype=weight_dtype)


class OfficialStep:
    """One optimizer step of the official recipe (see the module docstring)."""

    def __init__(self, ctx: Context, recipe: Recipe, models: Any) -> None:
        self.ctx, self.models = ctx, models
        self.device = ctx.device
        self.autocast = recipe.autocast if ctx.sdxl else None
        self.latent_dtype = self.autocast or torch.float32
        params = models.trainable_parameters()
        o = ctx.cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast == torch.float16 else None
        self.skipped = 0

    def __call__(self, batch: dict[str, Any], step: int) -> tuple[float, float]:
        models, dev = self.models, self.device
        t0 = time.perf_counter()
        # read now, on an idle GPU: GradScaler.get_scale() synchronizes
        scale = self.scaler.get_scale() if self.scaler is not None else None
        images = batch["images"].to(dev)
        with torch.no_grad():
            vae = models.vae
            latents = vae.encode(images.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            latents = latents.to(self.latent_dtype)
            enc = models.image_encoder
            feats = enc(batch["clip"].to(dev, enc.dtype), output_hidden_states=True).hidden_states[-2]
            out_1 = models.text_encoder(batch["ids"].to(dev), output_hidden_states=True)
            out_2 = models.text_encoder_2(batch["ids_2"].to(dev), output_hidden_states=True)
            embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
            pooled = out_2[0]
        _sync(dev)
        inputs_s = time.perf_counter() - t0

        b = latents.shape[0] // 2
        noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)  # same noise and timestep for both images
        sched = models.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev).repeat(2)
        noisy = sched.add_noise(latents, noise, t)
        res = images.shape[-1]
        time_ids = models.add_time_ids(2 * b, res)
        args = (noisy, t, embeds.repeat(2, 1, 1), pooled.repeat(2, 1), time_ids, feats.repeat(2, 1, 1))
        amp = torch.autocast(dev.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with amp:  # what accelerate's fp16 mixed precision wraps the model's forward in
            pred = models.ip_unet(*args)
        q_ref, q_gen = batch["q_ref"].to(dev), batch["q_gen"].to(dev)
        weight = torch.cat([1 - q_ref, q_gen]).unsqueeze(1).float()  # (2B, 1, h, w), latent resolution
        loss = torch.mean(weight * (pred.float() - noise.float()) ** 2)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < scale)
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = loss.item()  # the official loop logs the (gathered) loss every step
        return inputs_s, self.loss

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


class OursStep:
    """One optimizer step exactly as ``patchdpo_fast.training.Trainer`` runs it (single process, no DeepSpeed)."""

    def __init__(self, ctx: Context, recipe: Recipe, models: Any) -> None:
        from patchdpo_fast.training.build import build_engine as _build_engine
        from patchdpo_fast.training.inputs import ModelInputs as _Inputs

        overrides = {"optimizer": recipe.optimizer}
        self.cfg = ctx.cfg.model_copy(
            update={
                "optim": ctx.cfg.optim.model_copy(update=overrides),
                "model": ctx.cfg.model.model_copy(update={"gradient_checkpointing": recipe.gradient_checkpointing}),
            }
        )
        self.ctx, self.models = ctx, models
        _ensure_cache(ctx, models)
        self.inputs = _Inputs(self.cfg, models, ctx.env, ctx.cached)
        self.engine = _build_engine(self.cfg, models, ctx.env)
        self.skipped = 0

    def __call__(self, batch: dict[str, Any], step: int) -> tuple[float, float]:
        from patchdpo_fast.training.batch import draw_pair_noise
        from patchdpo_fast.training.step import forward_loss as _forward_loss

        cfg, dev = self.cfg, self.ctx.device
        t0 = time.perf_counter()
        x = self.inputs(batch, step)
        _sync(dev)
        inputs_s = time.perf_counter() - t0
        d = cfg.data
        rnd = draw_pair_noise(
            cfg.train.seed, step, batch["index"], tuple(x["lat_ref"].shape[1:]),
            self.models.noise_scheduler.config.num_train_timesteps, d.drop_image, d.drop_text, d.drop_both,
        )  # fmt: skip
        out = _forward_loss(cfg, self.models, self.engine, self.inputs, x, rnd, train=True)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):  # the trainer skips such a step (nan_policy=skip)
            self.engine.skip_micro_step()
            self.skipped += 1
        else:
            self.engine.backward(out.loss)
            self.engine.step()
        return inputs_s, loss

    def close(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.optimizer.state.clear()


def _count_flops(ctx: Context, models: Any, step: OursStep) -> dict[str, Any]:
    """UNet model FLOPs per image (forward, and forward + backward to the adapter), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from patchdpo_fast.training.batch import draw_pair_noise

    batch = ctx.cache_batches[0]
    x = step.inputs(batch, 0)
    rnd = draw_pair_noise(0, 0, batch["index"], tuple(x["lat_ref"].shape[1:]), 1000, 0.0, 0.0, 0.0)
    b = x["lat_ref"].shape[0]
    args = (
        torch.cat([x["lat_ref"], x["lat_gen"]]),
        rnd.timesteps.to(ctx.device).repeat(2),
        x["embeds"].repeat(2, 1, 1),
        x["pooled"].repeat(2, 1),
        models.add_time_ids(2 * b, ctx.cfg.data.resolution),
        x["feats"].repeat(2, 1, 1),
    )
    with FlopCounterMode(display=False) as fwd:
        pred = models.ip_unet(*args)
    with FlopCounterMode(display=False) as bwd:
        pred.backward(torch.ones_like(pred))
    for p in models.trainable_parameters():
        p.grad = None
    images = 2 * b
    return {
        "fwd_per_image": fwd.get_total_flops() / images,
        "fwd_bwd_per_image": (fwd.get_total_flops() + bwd.get_total_flops()) / images,
        "tokens": int(x["embeds"].shape[1]) + models.num_ip_tokens,
        "resolution": ctx.cfg.data.resolution,
    }


def run_recipe(ctx: Context, recipe: Recipe) -> dict[str, Any]:
    """Set up, warm up, time and tear down one recipe; returns its record."""
    dev, plan = ctx.device, ctx.plan
    rec: dict[str, Any] = {
        "name": recipe.name,
        "kind": recipe.kind,
        "summary": recipe.summary,
        "unet_dtype": _dt(recipe.unet_dtype) if ctx.sdxl else "float32",
        "encoder_dtype": _dt(recipe.encoder_dtype) if ctx.sdxl else "float32",
        "autocast": _dt(recipe.autocast) if ctx.sdxl else None,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "optimizer": recipe.optimizer if recipe.kind == "ours" else "adamw (torch)",
        "cudnn_deterministic": recipe.cudnn_deterministic if ctx.cuda else None,
        "vae_dtype": "float32",
        "attention": ctx.cfg.model.attention_backend,
        "input_cache": recipe.kind == "ours",
    }
    deterministic_before = torch.backends.cudnn.deterministic
    step_fn: OfficialStep | OursStep | None = None
    models = None
    t_setup = time.perf_counter()
    try:
        models = _recipe_models(ctx, recipe)
        torch.backends.cudnn.deterministic = bool(recipe.cudnn_deterministic and ctx.sdxl)
        step_fn = OfficialStep(ctx, recipe, models) if recipe.kind == "official" else OursStep(ctx, recipe, models)
        if recipe.kind == "ours":
            rec["loss_backend"] = _loss_backend(ctx, models)
        batches = ctx.raw_batches if recipe.kind == "official" else ctx.cache_batches
        _free(dev)
        rec["setup_s"] = round(time.perf_counter() - t_setup, 2)
        if ctx.cuda:
            rec["resident_bytes"] = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        times, inputs_times, losses = [], [], []
        for i in range(plan.warmup + plan.steps):
            _sync(dev)
            t0 = time.perf_counter()
            inputs_s, loss = step_fn(batches[i % len(batches)], i)
            _sync(dev)
            dt = time.perf_counter() - t0
            if i == 0:
                rec["first_step_s"] = round(dt, 3)
            if i >= plan.warmup:
                times.append(dt)
                inputs_times.append(inputs_s)
                losses.append(loss)
        if ctx.cuda:
            rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            rec["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
            rec["steady_allocated_bytes"] = torch.cuda.memory_allocated(dev)
        else:
            rec["peak_allocated_bytes"] = rec["peak_reserved_bytes"] = None
            rec["memory_reason"] = CPU_MEMORY_REASON
        step_s = statistics.median(times)
        images = 2 * plan.pairs
        rec.update(
            status="ok",
            warmup_steps=plan.warmup,
            timed_steps=len(times),
            step_s=step_s,
            step_s_min=min(times),
            step_s_max=max(times),
            inputs_s=statistics.median(inputs_times),
            pairs_per_s=plan.pairs / step_s,
            samples_per_s=images / step_s,
            losses=losses,
            finite=all(math.isfinite(v) for v in losses),
            skipped_steps=step_fn.skipped,
        )
        if recipe.kind == "ours" and not ctx.flops and not recipe.gradient_checkpointing:
            try:
                ctx.flops = _count_flops(ctx, models, step_fn)
            except Exception as exc:  # the timing stands without the count
                ctx.flops = {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        oom = isinstance(exc, torch.OutOfMemoryError)
        rec.update(status="oom" if oom else "error", error=f"{type(exc).__name__}: {exc}")
        if not oom:
            rec["traceback"] = traceback.format_exc(limit=8)
        if ctx.cuda and "peak_allocated_bytes" not in rec:
            rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    finally:
        torch.backends.cudnn.deterministic = deterministic_before
        if step_fn is not None:
            with contextlib.suppress(Exception):
                step_fn.close()
        del step_fn, models
        _free(dev)
    return rec


def _loss_backend(ctx: Context, models: Any) -> str:
    from patchdpo_fast.ops.dispatch import resolve_backend

    dtype = models.unet.conv_in.weight.dtype
    probe = torch.zeros(2, 4, 8, 8, device=ctx.device, dtype=dtype)
    w = torch.ones(2, 8, 8, device=ctx.device)
    try:
        return resolve_backend("patch_weighted_mse", ctx.cfg.loss.backend, probe, probe.float(), w)
    except ValueError as exc:
        return f"unresolved ({exc})"


def _bnb_status() -> str | None:
    """None when bitsandbytes' AdamW8bit is importable, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return f"bitsandbytes not importable ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Comparison and the whole run
# ---------------------------------------------------------------------------------------------------------------


def compare(records: list[dict[str, Any]], device_type: str, device_name: str) -> dict[str, Any]:
    """Speed and memory ratios of each ``ours`` recipe against the official recipe(s), and the target verdict."""
    ok = {r["name"]: r for r in records if r.get("status") == "ok"}
    rows = []
    for base_name in ("official", "official+fp16w"):
        base = ok.get(base_name)
        if base is None:
            continue
        for r in records:
            if r["kind"] != "ours" or r.get("status") != "ok":
                continue
            speed = r["samples_per_s"] / base["samples_per_s"]
            mem = None
            if r.get("peak_allocated_bytes") and base.get("peak_allocated_bytes"):
                mem = r["peak_allocated_bytes"] / base["peak_allocated_bytes"]
            rows.append(
                {
                    "recipe": r["name"],
                    "baseline": base_name,
                    "speedup": speed,
                    "memory_ratio": mem,
                    "meets_speed": speed >= TARGET_SPEEDUP,
                    "meets_memory": None if mem is None else mem <= TARGET_MEMORY_RATIO,
                }
            )
    main = [row for row in rows if row["baseline"] == "official"]
    verdict: dict[str, Any] = {"speedup_target": TARGET_SPEEDUP, "memory_ratio_target": TARGET_MEMORY_RATIO}
    if device_type != "cuda":
        verdict.update(status="not evaluated", reason="CPU run (tiny scale): the targets are for SDXL on an H200")
    elif not main:
        verdict.update(status="not evaluated", reason="no successful official/ours pair of results")
    else:
        both = [row["recipe"] for row in main if row["meets_speed"] and row["meets_memory"]]
        best_speed = max(main, key=lambda row: row["speedup"])
        with_mem = [row for row in main if row["memory_ratio"] is not None]
        best_mem = min(with_mem, key=lambda row: row["memory_ratio"]) if with_mem else None
        verdict.update(
            status="MET" if both else "NOT MET",
            met_by=both,
            best_speedup={"recipe": best_speed["recipe"], "value": best_speed["speedup"]},
            best_memory_ratio=None if best_mem is None else {"recipe": best_mem["recipe"],
                                                             "value": best_mem["memory_ratio"]},
            speed_met_by=[row["recipe"] for row in main if row["meets_speed"]],
            memory_met_by=[row["recipe"] for row in main if row["meets_memory"]],
        )  # fmt: skip
        if "h200" not in device_name.lower():
            verdict["note"] = f"the targets were set for an H200; this run's device is {device_name}"
    return {"rows": rows, "verdict": verdict}


def add_mfu(result: dict[str, Any]) -> None:
    """MFU = UNet model FLOPs per step / step time / the matmul rate measured in this run."""
    plan, flops = result["plan"], result.get("flops") or {}
    rate = (result.get("matmul") or {}).get("flops_per_s")
    if plan["scale"] == "sdxl" and plan["resolution"] == 512:
        per_image, source = DESIGN_FWD_BWD_FLOPS_512, "DESIGN.md section 4 (3.19 TFLOP fwd+bwd per 512 px image)"
    elif flops.get("fwd_bwd_per_image"):
        per_image, source = flops["fwd_bwd_per_image"], "FlopCounterMode in this run (fwd+bwd per image)"
    else:
        per_image, source = None, "unknown"
    result["mfu_basis"] = {"flops_per_image": per_image, "source": source, "matmul_flops_per_s": rate}
    for r in result["recipes"]:
        if r.get("status") == "ok" and per_image and rate:
            r["model_flops_per_step"] = per_image * 2 * plan["pairs"]
            r["achieved_flops_per_s"] = r["model_flops_per_step"] / r["step_s"]
            r["mfu"] = r["achieved_flops_per_s"] / rate


def run_benchmark(
    device: torch.device,
    scale: str = "auto",
    quick: bool = False,
    recipes: list[str] | None = None,
    warmup: int | None = None,
    steps: int | None = None,
    pairs: int | None = None,
    budget_s: float | None = None,
    loss_backend: str = "auto",
    out_json: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build once, run the recipes in order, return (and keep writing to ``out_json``) the result dict.

    On the CPU it runs with :func:`cpu_threads` intra-op threads (default 1, as the loss benchmarks: on a small
    shared VM more threads mostly measure OpenMP workers spin-waiting for the cores) and restores the setting.
    """
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(cpu_threads())
        try:
            return _run_benchmark(device, scale, quick, recipes, warmup, steps, pairs, budget_s, loss_backend,
                                  out_json, log)  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    return _run_benchmark(device, scale, quick, recipes, warmup, steps, pairs, budget_s, loss_backend, out_json, log)


def _run_benchmark(
    device: torch.device,
    scale: str,
    quick: bool,
    recipes: list[str] | None,
    warmup: int | None,
    steps: int | None,
    pairs: int | None,
    budget_s: float | None,
    loss_backend: str,
    out_json: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    start = time.perf_counter()
    if scale == "auto":
        scale = "sdxl" if device.type == "cuda" else "tiny"
    if scale == "sdxl" and device.type != "cuda":
        raise ValueError("the SDXL scale needs a CUDA device (use --scale tiny on the CPU)")
    plan = default_plan(device, scale, quick)
    plan = Plan(scale, plan.warmup if warmup is None else warmup, plan.steps if steps is None else steps,
                plan.pairs if pairs is None else pairs)  # fmt: skip
    wanted = list(recipes or RECIPE_NAMES)
    unknown = sorted(set(wanted) - set(RECIPE_NAMES))
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; choose from {RECIPE_NAMES}")
    if "official" in wanted:  # the baseline first; the rest in the table's order
        wanted = ["official"] + [n for n in RECIPE_NAMES if n in wanted and n != "official"]
    env = bc.environment_info(device)
    import diffusers
    import transformers

    env.update(
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        bitsandbytes=_bnb_status() or "importable",
    )
    result: dict[str, Any] = {
        "kind": "train_bench",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": env,
        "quick": quick,
        "plan": {
            "scale": scale,
            "warmup": plan.warmup,
            "steps": plan.steps,
            "pairs": plan.pairs,
            "images_per_step": 2 * plan.pairs,
            "budget_s": budget_s,
        },
        "recipes": [],
        "design": {
            "fwd_flops_512": DESIGN_FWD_FLOPS_512,
            "fwd_bwd_flops_512": DESIGN_FWD_BWD_FLOPS_512,
            "h200_bf16_expected": H200_BF16_EXPECTED,
        },
    }

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - start, 1)
        if out_json is not None:
            bc.write_json(out_json, result)

    with tempfile.TemporaryDirectory(prefix="patchdpo_train_bench_") as tmp:
        log(f"train bench: device {env['device_name']}, scale {scale}, {plan.pairs} pairs/step, "
            f"{plan.warmup} warm-up + {plan.steps} timed steps per recipe")  # fmt: skip
        result["matmul"] = measure_matmul_rate(device, quick)
        log(f"train bench: matmul {result['matmul']['dtype']} {result['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")
        t0 = time.perf_counter()
        ctx = build_context(device, plan, Path(tmp), loss_backend)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        result["plan"]["resolution"] = ctx.cfg.data.resolution
        u = ctx.base.unet
        result["model"] = {
            "unet_parameters": sum(p.numel() for n, p in u.named_parameters() if ".processor." not in n),
            "trainable_parameters": sum(p.numel() for p in ctx.base.trainable_parameters()),
            "ip_layers": len(ctx.base.ip_unet.ip_processors),
            "text_tokens": int(ctx.base.tokenizer.model_max_length),
            "ip_tokens": ctx.base.num_ip_tokens,
            "config": "sdxl_ipadapter_plus.yaml (SDXL-shaped, random init)" if scale == "sdxl" else "tiny_cpu.yaml",
        }
        log(f"train bench: models and data ready in {result['build_s']} s")
        save()
        bnb_reason = _bnb_status()
        for name in wanted:
            recipe = next(r for r in RECIPES if r.name == name)
            elapsed = time.perf_counter() - start
            if recipe.sdxl_only and scale != "sdxl":
                result["recipes"].append({"name": name, "kind": recipe.kind, "summary": recipe.summary,
                                          "status": "skipped", "reason": "SDXL scale (CUDA) only"})  # fmt: skip
                continue
            if recipe.optimizer == "adamw8bit" and bnb_reason:
                result["recipes"].append({"name": name, "kind": recipe.kind, "summary": recipe.summary,
                                          "status": "unavailable", "reason": bnb_reason})  # fmt: skip
                continue
            if budget_s is not None and elapsed > budget_s:
                reason = f"time budget {budget_s:.0f} s used up"
                result["recipes"].append({"name": name, "kind": recipe.kind, "summary": recipe.summary,
                                          "status": "skipped", "reason": reason})  # fmt: skip
                continue
            rec = run_recipe(ctx, recipe)
            result["recipes"].append(rec)
            if rec["status"] == "ok":
                peak = rec.get("peak_allocated_bytes")
                log(f"train bench: {name:15s} {rec['step_s'] * 1e3:8.1f} ms/step  {rec['pairs_per_s']:7.2f} pairs/s  "
                    + (f"peak {peak / GIB:6.2f} GiB" if peak else "") + f"  (setup {rec['setup_s']} s)")  # fmt: skip
            else:
                log(f"train bench: {name}: {rec['status']}: {rec.get('error')}")
            result["flops"] = ctx.flops
            result["cache_build_s"] = ctx.cache_build_s
            add_mfu(result)
            result["comparison"] = compare(result["recipes"], device.type, env["device_name"])
            save()
    result["flops"] = ctx.flops
    add_mfu(result)
    result["comparison"] = compare(result["recipes"], device.type, env["device_name"])
    save()
    return result


def failed(result: dict[str, Any]) -> list[str]:
    """Recipes that errored (skips for a missing package or the time budget do not count)."""
    return [r["name"] for r in result["recipes"] if r.get("status") in ("error", "oom")]


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)


def default_stem(device: torch.device, quick: bool) -> str:
    prefix = "gpu" if device.type == "cuda" else "cpu"
    stem = f"train_{prefix}_{bc.slug(bc.device_name(device))}_{datetime.now(timezone.utc):%Y%m%d}"
    return stem + ("_quick" if quick else "")


def cpu_threads() -> int:
    return max(1, int(os.environ.get("PATCHDPO_BENCH_CPU_THREADS", "1")))
