"""Perceiver Resampler of IP-Adapter-Plus (the ``image_proj`` part of the adapter).

The resampler turns the penultimate hidden states of a CLIP vision encoder, shape ``(B, S, embed_dim)``, into
``num_queries`` image-prompt tokens of width ``output_dim`` (the UNet's ``cross_attention_dim``).

Parameter names follow the original IP-Adapter-Plus checkpoint layout so that the state dict of :class:`Resampler`
is exactly the ``image_proj`` group of an official checkpoint::

    latents                        (1, num_queries, dim)
    proj_in.weight / .bias         (dim, embed_dim) / (dim,)
    layers.{i}.0.norm1.*           LayerNorm over the image features
    layers.{i}.0.norm2.*           LayerNorm over the latents
    layers.{i}.0.to_q.weight       (heads * dim_head, dim)
    layers.{i}.0.to_kv.weight      (2 * heads * dim_head, dim)      keys first, then values
    layers.{i}.0.to_out.weight     (dim, heads * dim_head)
    layers.{i}.1.0.*               LayerNorm of the feed-forward block
    layers.{i}.1.1.weight          (dim * ff_mult, dim)
    layers.{i}.1.3.weight          (dim, dim * ff_mult)
    proj_out.weight / .bias        (output_dim, dim) / (output_dim,)
    norm_out.weight / .bias        (output_dim,)

Stock diffusers converts this layout into its ``IPAdapterPlusImageProjection`` only for ``dim_head == 64`` and
``depth == 4``; :func:`resampler_config_from_state_dict` recovers every hyper-parameter from such a state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PerceiverAttention", "Resampler", "feed_forward", "resampler_config_from_state_dict"]


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """The resampler's feed-forward block: ``Sequential(LayerNorm, Linear, GELU, Linear)`` without biases on the
    linear layers (indices 0, 1, 3 hold the parameters, as in the original checkpoints)."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Cross-attention from the latent queries to ``[image features, latents]``.

    Args:
        dim: width of the latents and of the (projected) image features.
        dim_head: width of one attention head.
        heads: number of heads.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Attend from ``latents`` (B, Q, dim) to ``cat[x, latents]``; returns (B, Q, dim) without the residual."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        batch, n_q, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
        out = out.transpose(1, 2).reshape(batch, n_q, self.heads * self.dim_head)
        return self.to_out(out)


class Resampler(nn.Module):
    """IP-Adapter-Plus Perceiver Resampler.

    Args:
        dim: width of the learned latents (1280 for SDXL IP-Adapter-Plus).
        depth: number of (attention, feed-forward) layers (4 in every released checkpoint).
        dim_head: width of one attention head (64 in every released checkpoint).
        heads: number of attention heads (20 for SDXL IP-Adapter-Plus).
        num_queries: number of output image-prompt tokens (16).
        embedding_dim: width of the CLIP vision hidden states (1280 for ViT-H/14).
        output_dim: width of the output tokens, the UNet's ``cross_attention_dim`` (2048 for SDXL).
        ff_mult: hidden-width multiplier of the feed-forward blocks.
    """

    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 1280,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.config: dict[str, int] = {
            "dim": dim,
            "depth": depth,
            "dim_head": dim_head,
            "heads": heads,
            "num_queries": num_queries,
            "embedding_dim": embedding_dim,
            "output_dim": output_dim,
            "ff_mult": ff_mult,
        }
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
                for _ in range(depth)
            ]
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    @property
    def num_queries(self) -> int:
        """Number of image-prompt tokens produced per image."""
        return self.latents.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map image features ``(B, S, embedding_dim)`` to image-prompt tokens ``(B, num_queries, output_dim)``."""
        x = x.to(self.proj_in.weight.dtype)
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], dim_head: int = 64) -> dict[str, Any]:
    """Recover the :class:`Resampler` constructor arguments from an ``image_proj`` state dict.

    ``dim_head`` cannot be read from the shapes (only ``heads * dim_head`` can); every released IP-Adapter-Plus
    checkpoint and stock diffusers use 64.
    """
    required = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not an IP-Adapter-Plus image_proj state dict: missing {missing}")
    latents = state_dict["latents"]
    dim = int(latents.shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    inner = int(state_dict["layers.0.0.to_q.weight"].shape[0])
    if inner % dim_head:
        raise ValueError(f"attention width {inner} is not a multiple of dim_head={dim_head}")
    ff_inner = int(state_dict["layers.0.1.1.weight"].shape[0])
    return {
        "dim": dim,
        "depth": depth,
        "dim_head": dim_head,
        "heads": inner // dim_head,
        "num_queries": int(latents.shape[1]),
        "embedding_dim": int(state_dict["proj_in.weight"].shape[1]),
        "output_dim": int(state_dict["proj_out.weight"].shape[0]),
        "ff_mult": ff_inner // dim,
    }
