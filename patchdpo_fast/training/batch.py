"""Per-pair randomness, conditioning dropout and the loss of one training micro-batch.

Noise, timestep and dropout of a pair are drawn from a generator seeded by ``(seed, step, dataset index)``. They do
not depend on the rank, the world size or the RNG history, so a run on 2 ranks with B pairs each sees exactly what a
run on 1 rank with 2B pairs sees, and a resumed run continues bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchdpo_fast.ops import (
    PatchLossOutput,
    diffusion_dpo_loss,
    patch_dpo_loss,
    patch_weighted_mse,
    patchdpo_weights,
)

__all__ = [
    "PairNoise",
    "apply_dropout",
    "compute_loss",
    "draw_pair_noise",
    "loss_weights",
    "order_pairs",
    "pair_seed",
]

_M1, _M2, _M3 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def pair_seed(seed: int, step: int, index: int) -> int:
    """A well-mixed 63-bit seed for one pair at one optimizer step (splitmix64-style)."""
    x = (seed * _M1 + step * _M2 + index * _M3 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * _M2) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * _M3) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass
class PairNoise:
    """What a micro-batch of B pairs draws: shared by the two images of each pair."""

    noise: torch.Tensor  # (B, C, h, w) fp32
    timesteps: torch.Tensor  # (B,) int64
    drop_image: torch.Tensor  # (B,) bool
    drop_text: torch.Tensor  # (B,) bool


def draw_pair_noise(
    seed: int,
    step: int,
    indices: list[int],
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    drop_image: float,
    drop_text: float,
    drop_both: float,
) -> PairNoise:
    """Noise, timestep and conditioning dropout per pair (CPU, counter-based; see the module docstring).

    Dropout follows IP-Adapter: with probability ``drop_image`` only the image prompt is dropped, ``drop_text`` only
    the text, ``drop_both`` both.
    """
    noises, ts, di, dt = [], [], [], []
    for index in indices:
        gen = torch.Generator().manual_seed(pair_seed(seed, step, int(index)))
        noises.append(torch.randn(latent_shape, generator=gen))
        ts.append(int(torch.randint(0, num_train_timesteps, (1,), generator=gen)))
        u = float(torch.rand((), generator=gen))
        di.append(u < drop_image or drop_image + drop_text <= u < drop_image + drop_text + drop_both)
        dt.append(drop_image <= u < drop_image + drop_text + drop_both)
    return PairNoise(
        noise=torch.stack(noises),
        timesteps=torch.tensor(ts, dtype=torch.long),
        drop_image=torch.tensor(di, dtype=torch.bool),
        drop_text=torch.tensor(dt, dtype=torch.bool),
    )


def apply_dropout(values: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the rows of ``values`` selected by ``drop`` (B,) with the unconditional ``null`` (1, ...)."""
    if not bool(drop.any()):
        return values
    mask = drop.to(values.device).view(-1, *([1] * (values.dim() - 1)))
    return torch.where(mask, null.to(values.device, values.dtype).expand_as(values), values)


def order_pairs(
    loss_type: str,
    pair_order: str,
    lat_ref: torch.Tensor,
    lat_gen: torch.Tensor,
    q_ref: torch.Tensor,
    q_gen: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latents to denoise and the (winner, loser) quality maps of a micro-batch of B pairs.

    * the pair losses: ``cat[winners, losers]`` ``(2B, ...)``: reference images first (``pair_order=
      "reference_wins"``), or generated images first with the maps swapped along (``"generated_wins"``, a control);
    * ``reconstruction``: the generated images only ``(B, ...)`` (they are the targets); maps pass through unused.
    """
    if loss_type == "reconstruction":
        return lat_gen, q_ref, q_gen
    if pair_order == "generated_wins":
        return torch.cat([lat_gen, lat_ref]), q_gen, q_ref
    if pair_order != "reference_wins":
        raise ValueError(f"pair_order must be 'reference_wins' or 'generated_wins', got {pair_order!r}")
    return torch.cat([lat_ref, lat_gen]), q_ref, q_gen


def _to_grid(q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Quality maps ``(B, m, m)`` on a grid that divides the latent ``size`` (average-pooled when finer)."""
    if q.shape[-2] <= size[0] and q.shape[-1] <= size[1]:
        return q
    if q.shape[-2] % size[0] or q.shape[-1] % size[1]:
        raise ValueError(f"quality maps {tuple(q.shape[-2:])} cannot be pooled onto the latent grid {size}")
    return F.adaptive_avg_pool2d(q[:, None], size)[:, 0]


def loss_weights(
    loss_type: str, weight_mode: str, q_ref: torch.Tensor, q_gen: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor | None:
    """Patch weights ``(2B, h, w)`` for the configured loss, or None for unweighted losses.

    ``quality``: ``cat[1 - q_ref, q_gen]`` (patch_weighted_mse) or ``cat[1 - q_ref, 1 - 2 q_gen]`` (patch_dpo);
    ``gen_only``: the reference rows set to 1; ``uniform``: None (no weights).
    """
    if loss_type in ("mse", "diffusion_dpo") or weight_mode == "uniform":
        return None
    q_ref, q_gen = _to_grid(q_ref.float(), latent_hw), _to_grid(q_gen.float(), latent_hw)
    w = patchdpo_weights(q_ref, q_gen, "official" if loss_type == "patch_weighted_mse" else "dpo")
    if weight_mode == "gen_only":
        w[: q_ref.shape[0]] = 1.0
    return w


def compute_loss(
    loss_type: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    backend: str,
) -> PatchLossOutput:
    """The configured loss through the fused ops (``mse`` is the unweighted official loss on both images)."""
    if loss_type in ("patch_weighted_mse", "mse"):
        return patch_weighted_mse(pred, target, weight if loss_type != "mse" else None, backend=backend)
    if ref_pred is None:
        raise ValueError(f"loss.type={loss_type} needs the reference model's prediction")
    if loss_type == "diffusion_dpo" or weight is None:
        return diffusion_dpo_loss(pred, ref_pred, target, beta, backend=backend)
    return patch_dpo_loss(pred, ref_pred, target, weight, beta, backend=backend)
