"""One micro-step's loss: noising both images of each pair alike, the policy (and reference) forward and the fused
loss; the fixed-batch loss that shows whether a run learned; the logged window means."""

from __future__ import annotations

from typing import Any

import torch

from patchdpo_fast.config import TrainConfig
from patchdpo_fast.training.batch import apply_dropout, compute_loss, draw_pair_noise, loss_weights, order_pairs
from patchdpo_fast.training.distributed import DistEnv
from patchdpo_fast.training.inputs import ModelInputs, collate

__all__ = ["WINDOW_KEYS", "fixed_batch_loss", "forward_loss", "window_means"]

#: the per-micro-step metrics averaged into each logged record
WINDOW_KEYS = ("loss", "model_mse", "implicit_acc", "log_ratio")


def forward_loss(
    cfg: TrainConfig, models: Any, engine: Any, inputs: ModelInputs, x: dict[str, torch.Tensor], rnd: Any, train: bool
) -> Any:
    """Noise both images of each pair identically, run the policy (and reference) and compute the loss.

    ``x`` comes from :class:`ModelInputs`, ``rnd`` from :func:`~patchdpo_fast.training.batch.draw_pair_noise`;
    ``train=False`` runs the policy under no_grad without the engine (the fixed-batch loss). Returns the
    :func:`~patchdpo_fast.training.batch.compute_loss` output. ``loss.type=reconstruction`` denoises only the
    generated (target) images; ``loss.pair_order=generated_wins`` puts the generated images (and their maps) first,
    as winners.
    """
    dev, l_cfg = inputs.env.device, cfg.loss
    b = x["lat_ref"].shape[0]
    reps = 1 if l_cfg.type == "reconstruction" else 2
    noise = rnd.noise.to(dev).repeat(reps, 1, 1, 1)
    t = rnd.timesteps.to(dev).repeat(reps)
    latents, q_win, q_lose = order_pairs(
        l_cfg.type, l_cfg.pair_order, x["lat_ref"], x["lat_gen"], x["q_ref"], x["q_gen"]
    )
    sched = models.noise_scheduler
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    embeds = apply_dropout(x["embeds"], inputs.null["prompt_embeds"], rnd.drop_text).repeat(reps, 1, 1)
    feats = None  # no IP-Adapter (model.use_ip_adapter=false): text-only conditioning
    if x["feats"] is not None:
        feats = apply_dropout(x["feats"], inputs.null["image_features"], rnd.drop_image).repeat(reps, 1, 1)
    pooled = time_ids = None  # SD1.5-class UNets take no added conditioning (read from the UNet's config)
    if models.added_conditioning:
        pooled = apply_dropout(x["pooled"], inputs.null["pooled"], rnd.drop_text).repeat(reps, 1)
        time_ids = models.add_time_ids(reps * b, cfg.data.resolution).to(dev)
    args = (noisy, t, embeds, pooled, time_ids, feats)
    if train:
        pred = engine.forward(*args)
    else:
        with torch.no_grad():
            pred = engine.module(*args, use_reference=False)
    if l_cfg.type == "reconstruction":
        return compute_loss("mse", pred, target, None, None, l_cfg.beta, l_cfg.backend)
    ref_pred = engine.reference_forward(*args) if l_cfg.uses_reference_model else None
    if ref_pred is not None and ref_pred.dtype != pred.dtype:  # a reference UNet kept in a cheaper dtype
        ref_pred = ref_pred.to(pred.dtype)
    weight = loss_weights(l_cfg.type, l_cfg.effective_weight_mode, q_win, q_lose, tuple(pred.shape[-2:]))
    return compute_loss(l_cfg.type, pred, target, ref_pred, weight, l_cfg.beta, l_cfg.backend)


def fixed_batch_loss(cfg: TrainConfig, models: Any, engine: Any, inputs: ModelInputs, dataset: Any) -> float:
    """The configured loss on the first pairs of the dataset with fixed noise, timesteps and no dropout.

    Logged at the start and the end of a run: the same number before and after training shows whether the run
    learned. For the DPO losses it starts at log 2 (policy = reference).
    """
    indices = list(range(min(len(dataset), max(2, cfg.data.pairs_per_batch))))
    x = inputs(collate([dataset[i] for i in indices]), 0)
    rnd = draw_pair_noise(cfg.train.seed + 7919, 0, indices, tuple(x["lat_ref"].shape[1:]),
                          models.noise_scheduler.config.num_train_timesteps, 0.0, 0.0, 0.0)  # fmt: skip
    return float(forward_loss(cfg, models, engine, inputs, x, rnd, train=False).loss)


def window_means(window: list[dict[str, float]], env: DistEnv) -> dict[str, float]:
    """The logged metrics of a window of micro-steps: means over the micro-steps and over the ranks.

    Every rank saw the same number of equal micro-batches (a non-finite loss skips the micro-step on all of them), so
    the mean of the ranks' means is the mean over the global batch, as one rank with the whole batch would log it.
    One small all-reduce; every rank must call it at the same steps.
    """
    keys = [k for k in WINDOW_KEYS if window and k in window[0]]
    if not keys:  # every micro-step of the window was skipped, on every rank alike
        return {}
    n = len(window)
    sums = torch.tensor([sum(w.get(k, 0.0) for w in window) / n for k in keys], dtype=torch.float64)
    if env.distributed:
        sums = env.all_reduce_sum(sums.to(env.device if env.backend == "nccl" else "cpu")).cpu() / env.world_size
    return {k: float(v) for k, v in zip(keys, sums, strict=True)}
