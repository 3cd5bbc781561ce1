"""The fused matching kernel against the PyTorch reference (run under TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.quality.matching import match_backend, patch_match, patch_match_reference

TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def _inputs(b, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, d, generator=g).to(dtype)
    k = torch.randn(b, nk, d, generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (2, 37, 53, 19), (3, 64, 300, 70), (1, 300, 17, 600)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_triton_matches_reference(shape, dtype):
    q, k = _inputs(*shape, dtype)
    out = patch_match(q, k, backend="triton")
    ref = patch_match_reference(q, k)
    assert out.dtype == torch.float32 and out.shape == shape[:2]
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_mask(dtype):
    q, k = _inputs(3, 40, 90, 24, dtype, seed=1)
    mask = torch.rand(3, 90, generator=torch.Generator().manual_seed(2)) > 0.6
    mask[2] = False  # no candidate at all: the maximum of an empty set
    out = patch_match(q, k, mask, backend="triton")
    ref = patch_match_reference(q, k, mask)
    torch.testing.assert_close(out[:2], ref[:2], atol=TOL[dtype], rtol=0)
    assert torch.isneginf(out[2]).all() and torch.isneginf(ref[2]).all()
    # integer and float masks mean the same as bool
    torch.testing.assert_close(patch_match(q, k, mask.to(torch.uint8), backend="triton"), out)
    torch.testing.assert_close(patch_match(q, k, mask.float(), backend="torch"), ref)
    # a masked key never wins: masking everything but the best key keeps the value
    qn = torch.nn.functional.normalize(q[:1, :1].float(), dim=-1)
    best = qn @ torch.nn.functional.normalize(k[:1].float(), dim=-1).transpose(1, 2)
    only = torch.zeros(1, 90, dtype=torch.bool)
    only[0, int(best.argmax())] = True
    torch.testing.assert_close(
        patch_match(q[:1, :1], k[:1], only, backend="triton"), best.amax(-1), atol=TOL[dtype], rtol=0
    )


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 32, 50, generator=g).transpose(1, 2)  # (2, 50, 32), feature stride != 1
    k = torch.randn(2, 70, 64, generator=g)[:, ::2, 16:48]  # strided rows and a feature slice
    mask = (torch.rand(2, 70, generator=g) > 0.3)[:, ::2]
    assert not q.is_contiguous() and not k.is_contiguous() and not mask.is_contiguous()
    out = patch_match(q, k, mask, backend="triton")
    torch.testing.assert_close(
        out, patch_match_reference(q.contiguous(), k.contiguous(), mask.contiguous()), atol=2e-5, rtol=0
    )


def test_self_match_and_zero_features():
    x = torch.randn(2, 30, 16)
    torch.testing.assert_close(patch_match(x, x, backend="triton"), torch.ones(2, 30), atol=1e-5, rtol=0)
    z = torch.zeros(1, 3, 16)
    for backend in ("triton", "torch"):
        torch.testing.assert_close(patch_match(z, x[:1], backend=backend), torch.zeros(1, 3))


def test_reference_chunks_and_fp64():
    q, k = _inputs(2, 45, 33, 12, torch.float64, seed=4)
    full = patch_match_reference(q, k)
    assert full.dtype == torch.float64
    torch.testing.assert_close(patch_match_reference(q, k, chunk_elements=70), full)
    assert match_backend("auto", q, k) == "torch"  # the kernel has no fp64 path
    torch.testing.assert_close(patch_match(q, k), full)


def test_auto_backend_under_the_interpreter():
    q, k = _inputs(1, 4, 4, 4, torch.float32)
    assert match_backend("auto", q, k) == "triton"  # tests/conftest.py sets TRITON_INTERPRET=1
    assert match_backend("torch", q, k) == "torch"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"query": "x"}, "`query` must be a torch.Tensor"),
        ({"query": torch.randn(4, 8)}, "`query` must be 3-D"),
        ({"key": torch.randn(2, 5, 7)}, "`key` must have the batch size and feature size"),
        ({"key": torch.randn(3, 5, 8)}, "`key` must have the batch size and feature size"),
        ({"query": torch.ones(2, 4, 8, dtype=torch.int32)}, "`query` must have a floating dtype"),
        ({"key": torch.randn(2, 0, 8)}, "`key` must not be empty"),
        ({"key_mask": torch.ones(2, 4, dtype=torch.bool)}, "`key_mask` must have shape"),
        ({"key_mask": [1, 0]}, "`key_mask` must be a torch.Tensor"),
        ({"backend": "cuda"}, "`backend` must be"),
        ({"eps": 0.0}, "`eps` must be a positive number"),
        ({"query": torch.randn(2, 4, 8, dtype=torch.float64), "backend": "triton"}, "backend 'triton' supports"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {"query": torch.randn(2, 4, 8), "key": torch.randn(2, 5, 8), "key_mask": None, "backend": "auto"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        patch_match(args.pop("query"), args.pop("key"), args.pop("key_mask"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernel(dtype):
    q, k = _inputs(4, 1369, 1369, 768, dtype)
    q, k = q.cuda(), k.cuda()
    mask = torch.rand(4, 1369, device="cuda") > 0.2
    torch.testing.assert_close(patch_match(q, k, mask), patch_match_reference(q, k, mask), atol=TOL[dtype], rtol=0)
