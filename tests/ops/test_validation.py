"""Bad input gets a ValueError that names the argument and what was expected, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchdpo_fast.ops import (
    DiffusionDPOLoss,
    diffusion_dpo_loss,
    patch_dpo_loss,
    patch_weighted_mse,
    patchdpo_weights,
)

BACKENDS = ["auto", "torch", "triton"]


def good(n=4, c=2, h=8, w=8, grid=4):
    return torch.randn(n, c, h, w), torch.randn(n, c, h, w), torch.randn(n, c, h, w), torch.rand(n, grid, grid)


def call(op, pred, target, ref, weight, backend, **kw):
    if op == "patch_weighted_mse":
        return patch_weighted_mse(pred, target, weight, backend=backend, **kw)
    if op == "diffusion_dpo_loss":
        return diffusion_dpo_loss(pred, ref, target, backend=backend, **kw)
    return patch_dpo_loss(pred, ref, target, weight, backend=backend, **kw)


OPS = ["patch_weighted_mse", "diffusion_dpo_loss", "patch_dpo_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_mismatched_target_shape(op, backend):
    pred, target, ref, weight = good()
    with pytest.raises(ValueError, match=r"`target` must have the same shape as `pred` \(4, 2, 8, 8\)"):
        call(op, pred, target[:, :, :, :7], ref, weight, backend)


@pytest.mark.parametrize("op", ["diffusion_dpo_loss", "patch_dpo_loss"])
def test_mismatched_ref_pred_shape(op):
    pred, target, ref, weight = good()
    with pytest.raises(ValueError, match=r"`ref_pred` must have the same shape"):
        call(op, pred, target, ref[:, :1], weight, "auto")


@pytest.mark.parametrize("op", OPS)
def test_pred_not_4d(op):
    pred, target, ref, weight = good()
    with pytest.raises(ValueError, match=r"`pred` must be 4-D \(N, C, H, W\)"):
        call(op, pred[0], target[0], ref[0], weight, "auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["diffusion_dpo_loss", "patch_dpo_loss"])
def test_odd_batch_for_dpo(op, backend):
    pred, target, ref, weight = good(n=3)
    with pytest.raises(ValueError, match=r"N = 2B.*got N = 3"):
        call(op, pred, target, ref, weight, backend)


def test_odd_batch_is_fine_for_mse():
    pred, target, _, weight = good(n=3)
    assert torch.isfinite(patch_weighted_mse(pred, target, weight).loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["patch_weighted_mse", "patch_dpo_loss"])
def test_weight_grid_must_divide(op, backend):
    pred, target, ref, _ = good()
    with pytest.raises(ValueError, match=r"`weight` grid \(h, w\) = \(3, 3\) must divide .* \(8, 8\)"):
        call(op, pred, target, ref, torch.rand(4, 3, 3), backend)


@pytest.mark.parametrize("op", ["patch_weighted_mse", "patch_dpo_loss"])
def test_weight_wrong_batch_size(op):
    pred, target, ref, _ = good()
    with pytest.raises(ValueError, match=r"`weight` must have one map per sample, shape \(4, h, w\).*got \(2, 4, 4\)"):
        call(op, pred, target, ref, torch.rand(2, 4, 4), "auto")


@pytest.mark.parametrize("op", ["patch_weighted_mse", "patch_dpo_loss"])
def test_weight_wrong_rank(op):
    pred, target, ref, _ = good()
    with pytest.raises(ValueError, match=r"`weight` must have shape \(N, h, w\) or \(N, 1, h, w\)"):
        call(op, pred, target, ref, torch.rand(4, 2, 4, 4), "auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["pred", "target", "ref_pred", "weight"])
def test_integer_dtypes(name, backend):
    pred, target, ref, weight = good()
    tensors = {"pred": pred, "target": target, "ref_pred": ref, "weight": weight}
    tensors[name] = tensors[name].to(torch.int32)
    with pytest.raises(ValueError, match=rf"`{name}` must have a floating dtype.*torch.int32"):
        patch_dpo_loss(tensors["pred"], tensors["ref_pred"], tensors["target"], tensors["weight"], backend=backend)


def test_bool_weight_rejected():
    pred, target, _, weight = good()
    with pytest.raises(ValueError, match=r"`weight` must have a floating dtype.*torch.bool"):
        patch_weighted_mse(pred, target, weight > 0.5)


@pytest.mark.parametrize("name", ["target", "ref_pred", "weight"])
def test_tensors_on_different_devices(name):
    pred, target, ref, weight = good()
    tensors = {"target": target, "ref_pred": ref, "weight": weight}
    tensors[name] = tensors[name].to("meta")
    with pytest.raises(ValueError, match=rf"`{name}` is on meta but `pred` is on cpu"):
        patch_dpo_loss(pred, tensors["ref_pred"], tensors["target"], tensors["weight"])


def test_not_a_tensor():
    _, target, _, weight = good()
    with pytest.raises(ValueError, match=r"`pred` must be a torch.Tensor, got ndarray"):
        patch_weighted_mse(target.numpy(), target, weight)


def test_empty_input():
    with pytest.raises(ValueError, match="must not be empty"):
        patch_weighted_mse(torch.zeros(0, 2, 4, 4), torch.zeros(0, 2, 4, 4))


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf"), "big"])
def test_bad_beta(beta):
    pred, target, ref, weight = good()
    with pytest.raises(ValueError, match="`beta` must be a"):
        patch_dpo_loss(pred, ref, target, weight, beta=beta)
    with pytest.raises(ValueError, match="`beta` must be a"):
        DiffusionDPOLoss(beta=beta)(pred, ref, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["pred", "target", "ref_pred", "weight"])
def test_check_finite_names_the_bad_tensor(name, backend):
    pred, target, ref, weight = good()
    tensors = {"pred": pred, "target": target, "ref_pred": ref, "weight": weight}
    tensors[name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"`{name}` contains 1 non-finite value"):
        patch_dpo_loss(
            tensors["pred"], tensors["ref_pred"], tensors["target"], tensors["weight"], backend=backend,
            check_finite=True,
        )  # fmt: skip


def test_unknown_backend():
    pred, target, _, weight = good()
    with pytest.raises(ValueError, match=r"`backend` must be 'auto', 'triton' or 'torch', got 'jax'"):
        patch_weighted_mse(pred, target, weight, backend="jax")


def test_triton_backend_refuses_float64():
    pred, target, _, weight = good()
    with pytest.raises(ValueError, match="backend 'triton' supports dtypes"):
        patch_weighted_mse(pred.double(), target.double(), weight, backend="triton")


@pytest.mark.parametrize("beta", ["5", True, False, 1e300, 1e8 * 1.01, [5.0]])
def test_beta_must_be_a_real_number_in_range(beta):
    """Strings and bools are refused (not coerced), and a beta that would overflow float32 is refused."""
    pred, target, ref, weight = good()
    with pytest.raises(ValueError, match="`beta` must be a"):
        patch_dpo_loss(pred, ref, target, weight, beta=beta)
    with pytest.raises(ValueError, match="`beta` must be a"):
        DiffusionDPOLoss(beta=beta)(pred, ref, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_beta_is_finite_and_backends_agree(backend):
    from patchdpo_fast.ops.validation import MAX_BETA

    pred, target, ref, weight = good()
    out = patch_dpo_loss(pred, ref, target, weight, beta=MAX_BETA, backend=backend)
    want = patch_dpo_loss(pred, ref, target, weight, beta=MAX_BETA, backend="torch")
    assert torch.isfinite(out.loss) and torch.isfinite(out.log_ratio).all()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-4, atol=1e-4)
    # numpy scalars and one-element tensors are real numbers too
    assert patch_dpo_loss(pred, ref, target, weight, beta=np.float32(5000), backend=backend).loss.isfinite()
    assert patch_dpo_loss(pred, ref, target, weight, beta=torch.tensor(5000.0), backend=backend).loss.isfinite()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weight_is_refused_on_every_backend(backend, bad):
    pred, target, ref, weight = good()
    weight.view(-1)[3] = bad
    with pytest.raises(ValueError, match=r"`weight` contains 1 non-finite value"):
        patch_dpo_loss(pred, ref, target, weight, backend=backend)
    with pytest.raises(ValueError, match=r"`weight` contains 1 non-finite value"):
        patch_weighted_mse(pred, target, weight, backend=backend)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["q_ref", "q_gen"])
def test_quality_maps_outside_unit_interval_are_refused(bad, which):
    q = {"q_ref": torch.rand(2, 4, 4), "q_gen": torch.rand(2, 4, 4)}
    q[which][1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"`{which}` holds 1 value\(s\) outside \[0, 1\] or NaN"):
        patchdpo_weights(q["q_ref"], q["q_gen"], mode="dpo")
    edge = patchdpo_weights(torch.zeros(1, 2, 2), torch.ones(1, 2, 2), mode="dpo")  # the bounds themselves are fine
    assert torch.equal(edge, torch.cat([torch.ones(1, 2, 2), -torch.ones(1, 2, 2)]))
