"""Attention backends (sdpa / xformers / eager) agree; xformers is optional with a fallback or a clear error."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import diffusers  # noqa: F401  (imported before any test installs the fake xformers below)
import pytest
import torch

from patchdpo_fast.models import (
    AttnProcessor,
    IPAttnProcessor,
    XFormersUnavailableError,
    attention,
    build_models,
    resolve_backend,
    xformers_status,
)

XFORMERS_OK = xformers_status()[0]


@pytest.fixture
def fake_xformers(monkeypatch: pytest.MonkeyPatch):
    """A stand-in ``xformers.ops`` (BMHK layout, like the real one) so the xformers code path runs on the CPU."""

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        assert q.ndim == 4  # (batch, seq, heads, dim)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        if attn_bias is not None:
            assert attn_bias.shape == scores.shape
            scores = scores + attn_bias.double()
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)

    ops = types.ModuleType("xformers.ops")
    ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.__spec__ = importlib.machinery.ModuleSpec("xformers", None, is_package=True)
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    xformers_status.cache_clear()
    yield
    xformers_status.cache_clear()


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 7, 16, generator=g)
    k = torch.randn(2, 3, 11, 16, generator=g)
    v = torch.randn(2, 3, 11, 8, generator=g)
    mask = torch.zeros(2, 1, 1, 11)
    mask[0, ..., -3:] = -1e4
    return q, k, v, mask


@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_equals_eager(with_mask: bool) -> None:
    q, k, v, mask = _qkv()
    m = mask if with_mask else None
    ref = attention(q, k, v, backend="eager", scale=0.3, attn_mask=m)
    out = attention(q, k, v, backend="sdpa", scale=0.3, attn_mask=m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the eager reference really is softmax(QK^T * scale + mask) V
    manual = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + (0 if m is None else m), -1) @ v
    torch.testing.assert_close(ref, manual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_xformers_code_path_equals_eager(fake_xformers, with_mask: bool) -> None:
    assert xformers_status() == (True, "")
    assert resolve_backend("xformers", xformers_fallback=False) == "xformers"
    q, k, v, mask = _qkv(1)
    m = mask if with_mask else None
    ref = attention(q, k, v, backend="eager", attn_mask=m)
    torch.testing.assert_close(attention(q, k, v, backend="xformers", attn_mask=m), ref, rtol=1e-5, atol=1e-6)


def test_full_model_backends_equal_eager(fake_xformers, batch_factory) -> None:
    eager = build_models(tiny=True, seed=0, attention_backend="eager")
    batch = batch_factory(eager)
    with torch.no_grad():
        ref = eager.predict_noise(*batch.args())
        for backend in ("sdpa", "xformers"):
            assert eager.set_attention_backend(backend, xformers_fallback=False) == backend
            assert all(p.backend == backend for p in eager.unet.attn_processors.values())
            torch.testing.assert_close(eager.predict_noise(*batch.args()), ref, rtol=1e-4, atol=1e-5)
        built = build_models(tiny=True, seed=0, attention_backend="sdpa")
        torch.testing.assert_close(built.predict_noise(*batch.args()), ref, rtol=1e-4, atol=1e-5)


def test_processor_kinds(tiny_models) -> None:
    procs = tiny_models.unet.attn_processors
    ip = {n for n, p in procs.items() if isinstance(p, IPAttnProcessor)}
    plain = {n for n, p in procs.items() if isinstance(p, AttnProcessor)}
    assert ip and plain and ip | plain == set(procs)
    assert all(n.endswith("attn2.processor") for n in ip)
    assert all(n.endswith("attn1.processor") for n in plain)
    assert {p.backend for p in procs.values()} == {"sdpa"}
    assert all(p.num_tokens == tiny_models.num_ip_tokens for n, p in procs.items() if n in ip)


@pytest.mark.skipif(XFORMERS_OK, reason="xformers is installed and working here")
def test_xformers_missing_raises_when_fallback_disabled() -> None:
    ok, reason = xformers_status()
    assert not ok and "xformers" in reason
    with pytest.raises(XFormersUnavailableError, match="xformers"):
        resolve_backend("xformers", xformers_fallback=False)
    with pytest.raises(XFormersUnavailableError):
        build_models(tiny=True, attention_backend="xformers", xformers_fallback=False)


@pytest.mark.skipif(XFORMERS_OK, reason="xformers is installed and working here")
def test_xformers_missing_falls_back_to_sdpa(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(RuntimeWarning, match="falling back to 'sdpa'"):
        assert resolve_backend("xformers", xformers_fallback=True) == "sdpa"
    with pytest.warns(RuntimeWarning, match="falling back"):
        models = build_models(tiny=True, attention_backend="xformers", xformers_fallback=True)
    assert {p.backend for p in models.unet.attn_processors.values()} == {"sdpa"}
    assert models.ip_unet.attention_backend == "sdpa"


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3")


@pytest.mark.gpu
@pytest.mark.skipif(not XFORMERS_OK, reason="needs a working xformers")
def test_real_xformers_equals_eager_cuda() -> None:
    q, k, v, mask = (t.cuda().half() for t in _qkv(2))
    ref = attention(q, k, v, backend="eager", attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, backend="xformers", attn_mask=mask), ref, rtol=2e-3, atol=2e-3)
