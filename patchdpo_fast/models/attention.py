"""Attention processors for diffusers ``Attention`` modules: plain and IP-Adapter (decoupled cross-attention).

IP-Adapter conditions a frozen UNet on image-prompt tokens appended to the text tokens::

    encoder_hidden_states = cat[text tokens (B, T, C), ip tokens (B, N, C)]
    out = Attn(q, K_text, V_text) + scale * Attn(q, to_k_ip(ip), to_v_ip(ip))

Only ``to_k_ip`` / ``to_v_ip`` (no bias) are new parameters. For DPO an :class:`IPAttnProcessor` built with
``reference=True`` also keeps a frozen *reference* copy of those two projections (``ref_k_ip`` / ``ref_v_ip``); when
asked to (``use_reference``) it runs the same frozen attention layer with the reference weights, so the DPO
reference model costs one extra copy of the adapter weights, never a second UNet. Without a DPO loss nothing needs
the copy: ``reference=False`` (or :meth:`IPAttnProcessor.disable_reference`) leaves it out.

The attention kernel is chosen by name (:data:`ATTENTION_BACKENDS`):

* ``"sdpa"`` – :func:`torch.nn.functional.scaled_dot_product_attention` (default; flash / memory-efficient
  kernels where PyTorch has them),
* ``"xformers"`` – ``xformers.ops.memory_efficient_attention``; usable only where xformers imports *and* runs
  (see :func:`xformers_status`). :func:`resolve_backend` either raises or warns and falls back to ``"sdpa"``,
* ``"eager"`` – the textbook ``softmax(Q Kᵀ · scale) V`` with an fp32 softmax (the numerical reference).
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = [
    "ATTENTION_BACKENDS",
    "AttnProcessor",
    "IPAttnProcessor",
    "XFormersUnavailableError",
    "attention",
    "resolve_backend",
    "xformers_status",
]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "eager")


class XFormersUnavailableError(RuntimeError):
    """Raised when the ``xformers`` backend is requested but cannot be used and fallback is disabled."""


@functools.cache
def xformers_status() -> tuple[bool, str]:
    """Whether xformers' memory-efficient attention is importable and runs here.

    Returns ``(ok, reason)``; ``reason`` explains a failure. A tiny probe call runs on CUDA when available (else on
    the CPU), so a wheel built for another CUDA/PyTorch is caught here rather than mid-training. Cached.
    """
    try:
        import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken build raising anything at import time
        return False, f"xformers is not importable ({type(exc).__name__}: {exc})"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=dtype)
        xops.memory_efficient_attention(q, q, q)
    except Exception as exc:
        return False, f"xformers is installed but memory_efficient_attention failed on {device} ({exc})"
    return True, ""


def resolve_backend(backend: str, xformers_fallback: bool = True) -> str:
    """Validate an attention backend name and return the backend that will actually run.

    Args:
        backend: one of :data:`ATTENTION_BACKENDS`.
        xformers_fallback: when ``backend == "xformers"`` but xformers is unusable, log a warning and use
            ``"sdpa"`` (True) or raise :class:`XFormersUnavailableError` (False).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "xformers":
        ok, reason = xformers_status()
        if not ok:
            if not xformers_fallback:
                raise XFormersUnavailableError(
                    f"attention backend 'xformers' requested but {reason}; install a working xformers, choose "
                    "'sdpa', or allow the fallback (xformers_fallback=True)"
                )
            msg = f"attention backend 'xformers' unavailable: {reason}; falling back to 'sdpa'"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return "sdpa"
    return backend


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    backend: str = "sdpa",
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention on ``(B, H, L, D)`` tensors with the named backend.

    Args:
        query, key, value: ``(B, H, Lq, D)``, ``(B, H, Lk, D)``, ``(B, H, Lk, Dv)``.
        backend: ``"sdpa"``, ``"xformers"`` or ``"eager"`` (already resolved, see :func:`resolve_backend`).
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        attn_mask: optional additive mask broadcastable to ``(B, H, Lq, Lk)``.

    Returns:
        ``(B, H, Lq, Dv)`` in the dtype of ``query``.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if backend == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    if backend == "eager":
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if attn_mask is not None:
            scores = scores + attn_mask.float()
        probs = scores.softmax(dim=-1)
        return torch.matmul(probs, value.float()).to(query.dtype)
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if attn_mask is not None:
            # xformers wants a dense (B, H, Lq, Lk) bias whose rows start at aligned addresses: pad, then slice.
            b, h, lq, _ = query.shape
            lk = key.shape[2]
            bias = query.new_zeros(b, h, lq, lk + (-lk) % 8)[..., :lk]
            bias.copy_(attn_mask.to(query.dtype).expand(b, h, lq, lk))
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _ProcessorBase:
    """Shared pre/post-processing of diffusers' ``Attention`` (spatial/group norm, 4-D inputs, output projection)."""

    backend: str

    @staticmethod
    def _prepare(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4d = None
        if hidden_states.ndim == 4:
            shape4d = hidden_states.shape
            b, c, h, w = shape4d
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape4d

    @staticmethod
    def _mask(attn: Attention, attention_mask: torch.Tensor | None, key_len: int, batch: int):
        if attention_mask is None:
            return None
        mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])

    def _text_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Standard attention of the projected (not yet head-split) ``query`` to ``context``; returns (B, L, C)."""
        batch = query.shape[0]
        key = _split_heads(attn.to_k(context), attn.heads)
        value = _split_heads(attn.to_v(context), attn.heads)
        q = _split_heads(query, attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        mask = self._mask(attn, attention_mask, context.shape[1], batch)
        out = attention(q, key, value, backend=self.backend, scale=attn.scale, attn_mask=mask)
        return _merge_heads(out).to(query.dtype)

    @staticmethod
    def _finish(attn: Attention, out: torch.Tensor, residual: torch.Tensor, shape4d: torch.Size | None) -> torch.Tensor:
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if shape4d is not None:
            out = out.transpose(-1, -2).reshape(shape4d)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _linear(
    in_features: int,
    out_features: int,
    init: torch.Tensor | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> nn.Linear:
    """A bias-free Linear, randomly initialized or (without a wasted random init) a copy of ``init``.

    ``device=None`` means torch's default device (``skip_init`` would otherwise leave the weight on the meta device).
    """
    if device is None:
        device = torch.get_default_device()
    if init is None:
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(init)
    return layer


class AttnProcessor(_ProcessorBase):
    """Plain (self- or cross-) attention processor with a selectable backend.

    Args:
        backend: ``"sdpa"``, ``"xformers"`` or ``"eager"``.
        xformers_fallback: see :func:`resolve_backend`.
    """

    def __init__(self, backend: str = "sdpa", xformers_fallback: bool = True) -> None:
        self.requested_backend = backend
        self.backend = resolve_backend(backend, xformers_fallback)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        use_reference: bool | None = None,
    ) -> torch.Tensor:
        """Run the attention layer (``use_reference`` is accepted and ignored: this layer has no adapter)."""
        residual = hidden_states
        hidden_states, shape4d = self._prepare(attn, hidden_states, temb)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        out = self._text_attention(attn, query, context, attention_mask)
        return self._finish(attn, out, residual, shape4d)


class IPAttnProcessor(_ProcessorBase, nn.Module):
    """Decoupled IP-Adapter cross-attention processor, optionally with a frozen reference copy of its K/V weights.

    ``encoder_hidden_states`` must be ``cat[text tokens, ip tokens]`` along the sequence with exactly
    ``num_tokens`` IP tokens last.

    Args:
        hidden_size: output width of the layer's ``to_k``/``to_v`` (``heads * dim_head``).
        cross_attention_dim: width of the encoder tokens.
        num_tokens: number of IP tokens at the end of ``encoder_hidden_states``.
        scale: weight of the image branch.
        backend: attention backend name.
        xformers_fallback: see :func:`resolve_backend`.
        init_k, init_v: initial K/V projection weights ``(hidden_size, cross_attention_dim)`` (random otherwise).
        dtype, device: of the projections.
        reference: also keep a frozen reference copy of the initial K/V weights (for the DPO losses).

    Trainable: ``to_k_ip.weight``, ``to_v_ip.weight``. Frozen, when there is a reference: ``ref_k_ip.weight``,
    ``ref_v_ip.weight`` (``None`` otherwise).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        num_tokens: int = 16,
        scale: float = 1.0,
        backend: str = "sdpa",
        xformers_fallback: bool = True,
        init_k: torch.Tensor | None = None,
        init_v: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        reference: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.scale = scale
        self.requested_backend = backend
        self.backend = resolve_backend(backend, xformers_fallback)
        self.use_reference = False
        shape = (cross_attention_dim, hidden_size)
        self.to_k_ip = _linear(*shape, init_k, dtype, device)
        self.to_v_ip = _linear(*shape, init_v, dtype, device)
        self.ref_k_ip: nn.Linear | None = None
        self.ref_v_ip: nn.Linear | None = None
        if reference:
            self.enable_reference()

    @property
    def has_reference(self) -> bool:
        """Whether the frozen reference K/V copies exist."""
        return self.ref_k_ip is not None

    def enable_reference(self) -> None:
        """Create the frozen reference copies from the current (policy) K/V weights; a no-op if they exist."""
        if self.ref_k_ip is None:
            for name, policy in (("ref_k_ip", self.to_k_ip), ("ref_v_ip", self.to_v_ip)):
                w = policy.weight
                layer = _linear(policy.in_features, policy.out_features, w.detach(), w.dtype, w.device)
                setattr(self, name, layer.requires_grad_(False))

    def disable_reference(self) -> None:
        """Drop the reference copies (their memory is freed unless something else holds them)."""
        self.ref_k_ip = None
        self.ref_v_ip = None
        self.use_reference = False

    @torch.no_grad()
    def sync_reference(self) -> None:
        """Copy the current (policy) K/V weights into the frozen reference copies."""
        if self.ref_k_ip is None or self.ref_v_ip is None:
            raise RuntimeError("this IP processor has no reference copy (built with reference=False)")
        self.ref_k_ip.weight.copy_(self.to_k_ip.weight)
        self.ref_v_ip.weight.copy_(self.to_v_ip.weight)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, scale={self.scale}, backend={self.backend!r}"

    def __call__(  # diffusers inspects this signature to route cross_attention_kwargs
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        use_reference: bool | None = None,
    ) -> torch.Tensor:
        """Text attention plus ``scale`` times attention to the IP tokens.

        ``use_reference`` (routed through the UNet's ``cross_attention_kwargs``) selects the frozen reference K/V
        weights; ``None`` means this processor's ``use_reference`` flag.
        """
        if encoder_hidden_states is None:
            raise ValueError("IPAttnProcessor is a cross-attention processor: encoder_hidden_states is required")
        n_text = encoder_hidden_states.shape[1] - self.num_tokens
        if n_text < 0:
            raise ValueError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, fewer than the "
                f"{self.num_tokens} IP tokens expected"
            )
        use_ref = self.use_reference if use_reference is None else use_reference
        text, ip = encoder_hidden_states[:, :n_text], encoder_hidden_states[:, n_text:]

        residual = hidden_states
        hidden_states, shape4d = self._prepare(attn, hidden_states, temb)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        out = self._text_attention(attn, query, text, attention_mask)

        if use_ref and (self.ref_k_ip is None or self.ref_v_ip is None):
            raise RuntimeError(
                "use_reference=True, but this IP-Adapter has no reference copy (it is built only for the DPO losses: "
                "reference=True / enable_reference())"
            )
        k_proj, v_proj = (self.ref_k_ip, self.ref_v_ip) if use_ref else (self.to_k_ip, self.to_v_ip)
        ip = ip.to(k_proj.weight.dtype)
        ip_key = _split_heads(k_proj(ip).to(query.dtype), attn.heads)
        ip_value = _split_heads(v_proj(ip).to(query.dtype), attn.heads)
        q = _split_heads(query, attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        ip_out = attention(q, ip_key, ip_value, backend=self.backend, scale=attn.scale)
        out = out + self.scale * _merge_heads(ip_out).to(query.dtype)
        return self._finish(attn, out, residual, shape4d)
