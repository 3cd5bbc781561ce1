"""The fused Triton path (under TRITON_INTERPRET=1) and the PyTorch reference against each other and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from patchdpo_fast.ops import (
    DiffusionDPOLoss,
    PatchDPOLoss,
    PatchWeightedMSELoss,
    diffusion_dpo_loss,
    patch_dpo_loss,
    patch_weighted_mse,
    patchdpo_weights,
)
from patchdpo_fast.ops.reference import patch_dpo_loss_reference

LOSSES = ("patch_weighted_mse", "diffusion_dpo", "patch_dpo")


def make_inputs(n, c, h, w, stride, dtype=torch.float32, seed=0, signed=True):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, c, h, w, generator=gen).to(dtype)
    target = torch.randn(n, c, h, w, generator=gen).to(dtype)
    # the reference model is close to the policy, as in DPO training
    ref = (pred.float() + 0.3 * torch.randn(n, c, h, w, generator=gen)).to(dtype)
    weight = torch.rand(n, h // stride, w // stride, generator=gen)
    if signed:
        weight[n // 2 :] = 1.0 - 2.0 * weight[n // 2 :]  # loser rows of patch_dpo may be negative
    return pred, target, ref, weight


def run(loss, backend, pred, target, ref, weight, beta=3.0):
    if loss == "patch_weighted_mse":
        return patch_weighted_mse(pred, target, weight, backend=backend)
    if loss == "diffusion_dpo":
        return diffusion_dpo_loss(pred, ref, target, beta=beta, backend=backend)
    return patch_dpo_loss(pred, ref, target, weight, beta=beta, backend=backend)


def loss_and_grad(loss, backend, pred, target, ref, weight, grad_scale=1.0, beta=3.0):
    pred = pred.detach().clone().requires_grad_(True)
    out = run(loss, backend, pred, target, ref, weight, beta)
    (grad,) = torch.autograd.grad(out.loss * grad_scale, pred)
    return out, grad


def assert_outputs_close(a, b, rtol=1e-5, atol=1e-6):
    for field in ("loss", "model_err", "model_mse", "ref_err", "log_ratio", "implicit_acc"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=lambda m, f=field: f"{f}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_weighted_mse_by_hand(backend):
    # one sample, one channel, 2x2 pixels, one 2x2 patch with weight 3: loss = 3 * mean(d^2)
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    weight = torch.tensor([[[3.0]]])
    out = patch_weighted_mse(pred, target, weight, backend=backend)
    assert out.loss.item() == pytest.approx(3 * (1 + 4 + 9 + 16) / 4)
    assert out.model_mse.tolist() == pytest.approx([30 / 4])
    # per-pixel weights (s = 1): loss = mean(w * d^2)
    weight = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    out = patch_weighted_mse(pred, target, weight, backend=backend)
    assert out.loss.item() == pytest.approx((1 * 1 + 0 * 4 + 0.5 * 9 + 2 * 16) / 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_diffusion_dpo_by_hand(backend):
    # one pair, C=H=W=1: m_w = 1, m_l = 4, r_w = 0, r_l = 1 -> D = (1 - 4) - (0 - 1) = -2
    target = torch.zeros(2, 1, 1, 1)
    pred = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    ref = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    beta = 0.5
    out = diffusion_dpo_loss(pred, ref, target, beta=beta, backend=backend)
    assert out.log_ratio.tolist() == pytest.approx([-2.0])
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))  # -logsigmoid(-beta/2 * D)
    assert out.implicit_acc.item() == 1.0
    assert out.model_err.tolist() == pytest.approx([1.0, 4.0])
    assert out.ref_err.tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_dpo_by_hand(backend):
    # one pair, C=1, H=W=2 with a 1x2 patch grid (patch = one column); weights a = (1, 0), b = (1, -1)
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 2.0], [1.0, 2.0]]], [[[2.0, 1.0], [2.0, 1.0]]]])
    ref = torch.zeros_like(pred)
    weight = torch.tensor([[[1.0, 0.0]], [[1.0, -1.0]]])
    out = patch_dpo_loss(pred, ref, target, weight, beta=2.0, backend=backend)
    # m_w = (1, 4), m_l = (4, 1); r = 0; P = 2
    d = (1 * 1 + 0 * 4) / 2 - (1 * 4 + (-1) * 1) / 2
    assert out.log_ratio.tolist() == pytest.approx([d])
    assert out.loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(-d)).item())


# ---------------------------------------------------------------------------------------------------------------
# Reference: float64 gradcheck and identities
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_gradcheck_float64(loss):
    pred, target, ref, weight = make_inputs(4, 2, 6, 6, 3, dtype=torch.float64)
    pred.requires_grad_(True)
    weight = weight.double()
    beta = 0.7

    def fn(p):
        return run(loss, "torch", p, target, ref, weight, beta).loss

    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_weighted_mse_stride_one_matches_official_formula(backend):
    pred, target, _, weight = make_inputs(4, 4, 8, 8, 1, signed=False)
    out = patch_weighted_mse(pred, target, weight, backend=backend)
    official = (weight[:, None] * (pred - target) ** 2).mean()
    torch.testing.assert_close(out.loss, official, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_weighted_mse_without_weight_is_plain_mse(backend):
    pred, target, _, _ = make_inputs(2, 3, 5, 7, 1)
    out = patch_weighted_mse(pred, target, None, backend=backend)
    torch.testing.assert_close(out.loss, F.mse_loss(pred, target), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_patch_dpo_with_ones_equals_diffusion_dpo(backend, stride):
    pred, target, ref, _ = make_inputs(4, 3, 8, 8, stride)
    ones = torch.ones(4, 8 // stride, 8 // stride)
    a, ga = loss_and_grad("patch_dpo", backend, pred, target, ref, ones)
    b, gb = loss_and_grad("diffusion_dpo", backend, pred, target, ref, None)
    assert_outputs_close(a, b)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)


def test_weight_with_channel_dim_equals_3d():
    pred, target, ref, weight = make_inputs(4, 3, 8, 8, 2)
    for backend in ("torch", "triton"):
        a = patch_dpo_loss(pred, ref, target, weight, backend=backend)
        b = patch_dpo_loss(pred, ref, target, weight[:, None], backend=backend)
        assert_outputs_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Triton against the reference
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [
    # (N, C, H, W, stride): odd shapes, all strides that divide, and 1x1 patches
    (4, 3, 10, 10, 1),
    (4, 3, 10, 10, 2),
    (4, 3, 10, 10, 5),
    (2, 4, 16, 16, 4),
    (2, 4, 16, 16, 8),
    (6, 1, 7, 9, 1),
    (2, 5, 8, 24, 8),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_fp32(loss, shape):
    n, c, h, w, s = shape
    if s > h or h % s or w % s:
        pytest.skip("stride does not divide")
    pred, target, ref, weight = make_inputs(n, c, h, w, s, seed=sum(shape))
    a, ga = loss_and_grad(loss, "torch", pred, target, ref, weight)
    b, gb = loss_and_grad(loss, "triton", pred, target, ref, weight)
    assert_outputs_close(b, a)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-8)


def _naive_lowprec_loss(loss, pred, target, ref, weight, beta):
    """The loss computed in the inputs' own low precision (the 'torch low precision' baseline)."""
    n, _, h, w = pred.shape
    if weight is not None:
        sh, sw = h // weight.shape[1], w // weight.shape[2]
        wfull = weight.to(pred.dtype).repeat_interleave(sh, 1).repeat_interleave(sw, 2)[:, None]
    else:
        wfull = torch.ones((), dtype=pred.dtype)
    err = ((pred - target) ** 2 * wfull).mean(dim=(1, 2, 3))
    if loss == "patch_weighted_mse":
        return err.mean()
    rerr = ((ref - target) ** 2 * wfull).mean(dim=(1, 2, 3))
    d = (err[: n // 2] - err[n // 2 :]) - (rerr[: n // 2] - rerr[n // 2 :])
    return -F.logsigmoid(-0.5 * beta * d).mean()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 10, 10, 2), (2, 4, 16, 16, 8)], ids=lambda s: "x".join(map(str, s)))
def test_triton_low_precision(loss, dtype, shape):
    """flash-attention's criterion: |out - ref_fp32| <= 2 |out_torch_lowprec - ref_fp32| + atol."""
    n, c, h, w, s = shape
    pred, target, ref, weight = make_inputs(n, c, h, w, s, dtype=dtype, seed=7)
    if loss == "patch_weighted_mse":
        weight = weight.abs()
    ref32, g32 = loss_and_grad(loss, "torch", pred.float(), target.float(), ref.float(), weight)
    out, grad = loss_and_grad(loss, "triton", pred, target, ref, weight)
    assert grad.dtype == dtype and out.loss.dtype == torch.float32
    lowprec = _naive_lowprec_loss(loss, pred, target, ref, weight, 3.0).float()
    bound = 2 * (lowprec - ref32.loss).abs() + 1e-4
    assert (out.loss - ref32.loss).abs() <= bound
    # the gradient is computed in fp32 and rounded once into `dtype`: within one rounding step of the fp32 one
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.float(), g32, rtol=2 * eps, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_triton_mixed_input_dtypes(loss):
    pred, target, ref, weight = make_inputs(4, 3, 8, 8, 2, seed=3)
    pred16 = pred.to(torch.bfloat16)
    _, ga = loss_and_grad(loss, "torch", pred16.float(), target, ref, weight)
    b, gb = loss_and_grad(loss, "triton", pred16, target, ref.half(), weight.double().float())
    torch.testing.assert_close(b.loss, loss_and_grad(loss, "torch", pred16, target, ref.half(), weight)[0].loss)
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(gb.float(), ga, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw", "expanded_target"])
def test_triton_non_contiguous_inputs(loss, layout):
    n, c, h, w, s = 4, 3, 8, 8, 2
    pred, target, ref, weight = make_inputs(n, c, h, w, s, seed=11)
    if layout == "channels_last":
        p, t, r = (x.to(memory_format=torch.channels_last) for x in (pred, target, ref))
        assert not p.is_contiguous()
    elif layout == "sliced":  # every other channel and every other column of wider tensors
        gen = torch.Generator().manual_seed(12)
        p, t, r = (torch.randn(n, 2 * c, h, 2 * w, generator=gen)[:, ::2, :, ::2] for _ in range(3))
        pred, target, ref = (x.contiguous() for x in (p, t, r))
    elif layout == "transposed_hw":
        p, t, r = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (pred, target, ref))
    else:  # target broadcast over the batch (stride 0), weight a non-contiguous view
        target = target[:1].expand(n, c, h, w).contiguous()
        p, r = pred, ref
        t = target[:1].expand(n, c, h, w)
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (p.is_contiguous() and t.is_contiguous())
    a, ga = loss_and_grad(loss, "torch", pred, target, ref, weight)
    b, gb = loss_and_grad(loss, "triton", p, t, r, weight)
    assert_outputs_close(b, a)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-8)
    if layout == "channels_last":
        assert gb.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_output_is_honoured(loss, backend):
    pred, target, ref, weight = make_inputs(4, 2, 6, 6, 3, seed=5)
    _, g1 = loss_and_grad(loss, backend, pred, target, ref, weight, grad_scale=1.0)
    _, g2 = loss_and_grad(loss, backend, pred, target, ref, weight, grad_scale=-2.5)
    torch.testing.assert_close(g2, -2.5 * g1, rtol=1e-5, atol=1e-9)
    # explicit grad_output tensor through backward()
    p = pred.clone().requires_grad_(True)
    run(loss, backend, p, target, ref, weight).loss.backward(torch.tensor(4.0))
    torch.testing.assert_close(p.grad, 4.0 * g1, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
def test_only_pred_receives_gradient(loss):
    pred, target, ref, weight = make_inputs(4, 2, 4, 4, 2)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    ref.requires_grad_(True)
    weight.requires_grad_(True)
    for backend in ("torch", "triton"):
        out = run(loss, backend, pred, target, ref, weight)
        out.loss.backward()
        assert pred.grad is not None and target.grad is None and ref.grad is None and weight.grad is None
        for term in (out.model_err, out.model_mse, out.ref_err, out.log_ratio, out.implicit_acc):
            assert term is None or not term.requires_grad
        pred.grad = None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_beta_is_finite_and_matches(backend):
    pred, target, ref, weight = make_inputs(4, 3, 8, 8, 2, seed=9)
    for beta in (5000.0, 1e7):
        out, grad = loss_and_grad("patch_dpo", backend, pred, target, ref, weight, beta=beta)
        ref_out = patch_dpo_loss_reference(pred, ref, target, weight, beta)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-4, atol=1e-5)


def test_nan_input_propagates_when_unchecked():
    pred, target, ref, weight = make_inputs(4, 2, 4, 4, 2)
    pred[1, 0, 0, 0] = float("nan")
    for backend in ("torch", "triton"):
        assert torch.isnan(patch_dpo_loss(pred, ref, target, weight, backend=backend).loss)


# ---------------------------------------------------------------------------------------------------------------
# Weights, modules and dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_patchdpo_weights_modes():
    q_ref = torch.tensor([[[0.0, 1.0]]])
    q_gen = torch.tensor([[[0.25, 1.0]]])
    torch.testing.assert_close(patchdpo_weights(q_ref, q_gen, "official"), torch.tensor([[[1.0, 0.0]], [[0.25, 1.0]]]))
    torch.testing.assert_close(patchdpo_weights(q_ref, q_gen, "dpo"), torch.tensor([[[1.0, 0.0]], [[0.5, -1.0]]]))
    four_d = patchdpo_weights(q_ref[:, None], q_gen[:, None], "dpo")
    assert four_d.shape == (2, 1, 2)


def test_patchdpo_weights_bad_input():
    q = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        patchdpo_weights(q, q, "nope")
    with pytest.raises(ValueError, match="q_gen"):
        patchdpo_weights(q, torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="q_ref"):
        patchdpo_weights(torch.rand(2, 2, 4, 4), q)
    with pytest.raises(ValueError, match="floating"):
        patchdpo_weights(q, torch.ones(2, 4, 4, dtype=torch.int64))


def test_modules_match_functional():
    pred, target, ref, weight = make_inputs(4, 3, 8, 8, 2)
    assert_outputs_close(
        PatchWeightedMSELoss(backend="torch")(pred, target, weight), patch_weighted_mse(pred, target, weight)
    )
    assert_outputs_close(
        DiffusionDPOLoss(beta=7.0)(pred, ref, target), diffusion_dpo_loss(pred, ref, target, 7.0, backend="torch")
    )
    module = PatchDPOLoss(beta=7.0, backend="triton")
    assert "beta=7.0" in repr(module)
    assert_outputs_close(module(pred, ref, target, weight), patch_dpo_loss(pred, ref, target, weight, 7.0))


def test_auto_dispatch_under_interpreter():
    from patchdpo_fast.ops import resolve_backend

    x = torch.zeros(2, 1, 2, 2)
    assert resolve_backend("op", "auto", x, x) == "triton"  # TRITON_INTERPRET=1 in conftest
    assert resolve_backend("op", "auto", x.double(), x.double()) == "torch"  # fp64: Triton does not declare it
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("op", "triton", x.double(), x)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("op", "cuda-magic", x, x)


def test_float64_auto_runs_reference():
    pred, target, ref, weight = make_inputs(4, 2, 4, 4, 2, dtype=torch.float64)
    out = patch_dpo_loss(pred, ref, target, weight.double())
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, patch_dpo_loss_reference(pred, ref, target, weight.double(), 5000.0).loss)


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_triton_matches_reference(loss):
    pred, target, ref, weight = (t.cuda() for t in make_inputs(8, 4, 64, 64, 8, dtype=torch.bfloat16))
    a, ga = loss_and_grad(loss, "torch", pred.float(), target.float(), ref.float(), weight)
    b, gb = loss_and_grad(loss, "triton", pred, target, ref, weight)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb.float(), ga, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("loss", ["diffusion_dpo", "patch_dpo"])
def test_identical_reference_gives_exact_zero_log_ratio(loss):
    """At step 0 the policy equals the reference: D is exactly 0 and the loss exactly log 2 (no cancellation)."""
    pred, target, _, weight = make_inputs(4, 4, 16, 16, 4, seed=21)
    out, grad = loss_and_grad(loss, "triton", pred, target, pred.clone(), weight, beta=5000.0)
    assert torch.equal(out.log_ratio, torch.zeros(2))
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-7)
    torch.testing.assert_close(out.ref_err, out.model_err)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_confident_pairs_keep_relative_accuracy():
    """A tiny loss (-logsigmoid of a large logit) keeps its relative precision in the fused epilogue."""
    pred, target, ref, weight = make_inputs(2, 2, 8, 8, 2, seed=4)
    ref = target + 2.0 * (pred - target)  # winner's reference error >> model error: D strongly negative
    ref[1] = pred[1]
    ref64 = patch_dpo_loss_reference(pred.double(), ref.double(), target.double(), weight.double(), 60.0)
    out = patch_dpo_loss(pred, ref, target, weight, beta=60.0, backend="triton")
    assert 0 < ref64.loss.item() < 1e-6
    assert out.loss.item() == pytest.approx(ref64.loss.item(), rel=1e-3)
