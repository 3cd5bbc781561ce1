"""Bad input gets a ValueError that names the argument and what was expected, on every backend."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.ops import DiffusionDPOLoss, diffusion_dpo_loss, patch_dpo_loss, patch_weighted_mse

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
