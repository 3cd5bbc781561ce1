"""The fused kernels' own machinery under TRITON_INTERPRET=1: the multi-program epilogue at large batches, the one-pass
MSE forward+gradient, the in-place grad_output rescale, wide (int64) offsets, recorded launches and their bytes."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.kernels import patch_loss as pl
from patchdpo_fast.kernels.launch import record_launches
from patchdpo_fast.ops import diffusion_dpo_loss, patch_dpo_loss, patch_weighted_mse
from patchdpo_fast.ops.reference import patch_weighted_mse_reference


def _inputs(n, c, h, w, s, dtype=torch.float32, seed=0, layout="nchw"):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, c, h, w, generator=gen).to(dtype)
    target = torch.randn(n, c, h, w, generator=gen).to(dtype)
    ref = (pred.float() + 0.3 * torch.randn(n, c, h, w, generator=gen)).to(dtype)
    weight = torch.rand(n, h // s, w // s, generator=gen)
    if layout == "channels_last":
        pred, target, ref = (t.to(memory_format=torch.channels_last) for t in (pred, target, ref))
    return pred, target, ref, weight


def _epilogue_reference(partial: torch.Tensor, numel: int, beta: float, is_dpo: bool) -> dict[str, torch.Tensor]:
    sums = partial.double().sum(-1) / numel  # (planes, N)
    out = {"model_err": sums[0], "model_mse": sums[1]}
    if not is_dpo:
        out["loss"] = sums[0].mean()
        return out
    b = partial.shape[1] // 2
    dd = sums[2]
    log_ratio = dd[:b] - dd[b:]
    out.update(
        ref_err=sums[0] - dd,
        log_ratio=log_ratio,
        loss=-torch.nn.functional.logsigmoid(-0.5 * beta * log_ratio).mean(),
        implicit_acc=(log_ratio < 0).double().mean(),
    )
    return out


@pytest.mark.parametrize("n", [6, 4096, 8192])
@pytest.mark.parametrize("is_dpo", [False, True], ids=["mse", "dpo"])
def test_epilogue_any_batch(n, is_dpo):
    """Up to 2B = 8192 (several epilogue programs plus the second-level sum) against a float64 reduction."""
    gen = torch.Generator().manual_seed(n)
    tiles, numel, beta = 3, 40, 0.5
    partial = torch.randn(3 if is_dpo else 2, n, tiles, generator=gen)
    partial[:2] = partial[:2].abs()
    lanes = n // 2 if is_dpo else n
    programs = pl._epilogue_config(lanes, tiles)[2]
    assert (programs > 1) == (lanes > 1024)
    with record_launches() as rec:
        out = pl.patch_loss_epilogue(partial, numel, beta, is_dpo)
    names = [x.name for x in rec.launches]
    assert names == (["_patch_loss_epilogue_kernel"] + (["_block_sum_kernel"] if programs > 1 else []))
    ref = _epilogue_reference(partial, numel, beta, is_dpo)
    for key, value in ref.items():
        torch.testing.assert_close(out[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    if not is_dpo:
        assert torch.all(out["coef"] == torch.tensor(1.0 / n))


@pytest.mark.parametrize("loss", ["patch_weighted_mse", "patch_dpo"])
def test_multi_program_epilogue_through_the_loss(loss, monkeypatch):
    """The same loss and gradient when the epilogue is split into programs of 2 lanes (forced) as with one program."""
    pred, target, ref, weight = _inputs(12, 3, 8, 8, 2, seed=3)

    def run():
        p = pred.clone().requires_grad_(True)
        if loss == "patch_weighted_mse":
            out = patch_weighted_mse(p, target, weight, backend="triton")
        else:
            out = patch_dpo_loss(p, ref, target, weight, beta=3.0, backend="triton")
        (g,) = torch.autograd.grad(out.loss * 0.7, p)
        return out, g

    one, g_one = run()
    real = pl._epilogue_config
    monkeypatch.setattr(pl, "_epilogue_config", lambda lanes, tiles: (2, 1, -(-lanes // 2)))
    with record_launches() as rec:
        split, g_split = run()
    assert "_block_sum_kernel" in [x.name for x in rec.launches]
    monkeypatch.setattr(pl, "_epilogue_config", real)
    torch.testing.assert_close(split.loss, one.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split.model_err, one.model_err)
    if split.implicit_acc is not None:
        assert split.implicit_acc.item() == one.implicit_acc.item()
    torch.testing.assert_close(g_split, g_one, rtol=1e-6, atol=1e-9)


def test_one_pass_mse_writes_the_gradient_in_the_forward(monkeypatch):
    pred, target, _, weight = _inputs(4, 3, 8, 8, 2)
    p = pred.clone().requires_grad_(True)
    with record_launches() as rec:
        out = patch_weighted_mse(p, target, weight, backend="triton")
        (g,) = torch.autograd.grad(out.loss, p)
    names = [x.name for x in rec.launches]
    assert names == ["_patch_loss_fwd_kernel", "_patch_loss_epilogue_kernel", "_scale_kernel"]
    fwd = rec.launches[0]
    assert fwd.kwargs["WRITE_GRAD"] is True
    # the gradient is the buffer the forward kernel wrote: no backward pass over pred/target/weight
    assert any(isinstance(a, torch.Tensor) and a.data_ptr() == g.data_ptr() for a in fwd.args)
    ref = pred.clone().requires_grad_(True)
    patch_weighted_mse_reference(ref, target, weight).loss.backward()
    torch.testing.assert_close(g, ref.grad, rtol=1e-5, atol=1e-9)

    # .backward(): autograd adopts the buffer as pred.grad without a copy (nothing else holds on to it)
    seen: list[int] = []
    forward = pl.patch_loss_forward

    def spy(*args, **kwargs):
        result = forward(*args, **kwargs)
        seen.append(result["grad_pred"].data_ptr())
        return result

    monkeypatch.setattr(pl, "patch_loss_forward", spy)
    patch_weighted_mse(p, target, weight, backend="triton").loss.backward()
    assert p.grad.data_ptr() == seen[0]


def test_one_pass_bytes_are_the_ideal_minimum():
    """fwd+bwd of patch_weighted_mse reads pred, target, weight once and writes grad_pred once, plus small terms."""
    pred, target, _, weight = _inputs(8, 4, 16, 16, 2, dtype=torch.bfloat16)
    p = pred.clone().requires_grad_(True)
    with record_launches() as rec:
        out = patch_weighted_mse(p, target, weight, backend="triton")
        torch.autograd.grad(out.loss, p)
    per_tensor = rec.by_tensor()
    nb = pred.numel() * pred.element_size()
    assert per_tensor["pred"] == nb and per_tensor["target"] == nb and per_tensor["grad_pred"] == nb
    assert per_tensor["weight"] == weight.numel() * 4
    small = rec.bytes_moved - 3 * nb - weight.numel() * 4
    partial = next(x for x in rec.launches if x.name == "_patch_loss_fwd_kernel").writes
    partial_bytes = dict(partial)["partial sums"]
    # what is left: the partial sums (written, read back) and the per-sample terms, loss and grad_output
    assert small == 2 * partial_bytes + 3 * 4 * 8 + 4 + 4
    # grad_output == 1: the rescale kernel touches nothing but grad_output itself
    scale = rec.launches[-1]
    assert scale.name == "_scale_kernel" and scale.bytes_read == 4 and scale.bytes_written == 0


def test_three_kernel_path_moves_more():
    """The DPO path re-reads pred, target and weight in its backward pass (the reason MSE gets one pass)."""
    pred, target, ref, weight = _inputs(8, 4, 16, 16, 2, dtype=torch.bfloat16)
    p = pred.clone().requires_grad_(True)
    with record_launches() as rec:
        out = patch_dpo_loss(p, ref, target, weight, beta=2.0, backend="triton")
        torch.autograd.grad(out.loss, p)
    nb = pred.numel() * pred.element_size()
    per_tensor = rec.by_tensor()
    assert per_tensor["pred"] == 2 * nb and per_tensor["target"] == 2 * nb and per_tensor["ref_pred"] == nb
    assert [x.name for x in rec.launches][-1] == "_patch_loss_bwd_kernel"


def test_no_gradient_no_gradient_write():
    """Under torch.no_grad, or for a pred that needs no gradient, the forward writes no gradient."""
    pred, target, _, weight = _inputs(4, 3, 8, 8, 2)
    p = pred.clone().requires_grad_(True)
    with torch.no_grad(), record_launches() as rec_no_grad:
        patch_weighted_mse(p, target, weight, backend="triton")
    with record_launches() as rec_frozen:
        patch_weighted_mse(pred, target, weight, backend="triton")
    for rec in (rec_no_grad, rec_frozen):
        assert rec.launches[0].kwargs["WRITE_GRAD"] is False
        assert rec.by_tensor().get("grad_pred", 0) == 0


def test_retain_graph_second_backward_recomputes():
    pred, target, _, weight = _inputs(4, 3, 8, 8, 2, seed=5)
    p = pred.clone().requires_grad_(True)
    out = patch_weighted_mse(p, target, weight, backend="triton")
    out.loss.backward(torch.tensor(2.0), retain_graph=True)
    first = p.grad.clone()
    with record_launches() as rec:
        out.loss.backward(torch.tensor(-1.0))
    assert [x.name for x in rec.launches] == ["_patch_loss_bwd_kernel"]  # the one-pass buffer was handed over
    torch.testing.assert_close(p.grad, first * 0.5, rtol=1e-5, atol=1e-9)
    ref = pred.clone().requires_grad_(True)
    patch_weighted_mse_reference(ref, target, weight).loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(first, ref.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("grad_output", [1.0, 0.375, -3.0])
def test_one_pass_dtypes_layouts_grad_output(dtype, layout, grad_output):
    pred, target, _, weight = _inputs(4, 4, 8, 8, 4, dtype=dtype, seed=9, layout=layout)
    p = pred.clone().requires_grad_(True)
    out = patch_weighted_mse(p, target, weight, backend="triton")
    (g,) = torch.autograd.grad(out.loss, p, torch.tensor(grad_output))
    r = pred.float().clone().requires_grad_(True)
    ref = patch_weighted_mse_reference(r, target.float(), weight)
    (g_ref,) = torch.autograd.grad(ref.loss, r, torch.tensor(grad_output))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    assert g.dtype == dtype
    if layout == "channels_last":
        assert g.is_contiguous(memory_format=torch.channels_last)
    eps = torch.finfo(dtype).eps
    # fp32 gradient rounded once into dtype in the forward, once more by a rescale that is not a power of two
    torch.testing.assert_close(g.float(), g_ref, rtol=4 * eps, atol=1e-7)


def test_fp16_keeps_the_loss_scaled_single_rounding():
    """fp16 takes the three-kernel path: a GradScaler-sized grad_output is applied in fp32 before the one rounding,
    so gradients far below fp16's normal range survive (the one-pass buffer would flush them to zero first)."""
    pred, target, _, weight = _inputs(4, 4, 32, 32, 4, dtype=torch.float16, seed=13)
    target = (pred.float() + 1e-3 * torch.randn(pred.shape)).half()  # small errors: tiny unscaled gradients
    p = pred.clone().requires_grad_(True)
    with record_launches() as rec:
        out = patch_weighted_mse(p, target, weight, backend="triton")
        (g,) = torch.autograd.grad(out.loss, p, torch.tensor(65536.0))
    assert rec.launches[0].kwargs["WRITE_GRAD"] is False
    assert rec.launches[-1].name == "_patch_loss_bwd_kernel"
    r = pred.float().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(patch_weighted_mse_reference(r, target.float(), weight).loss, r,
                                   torch.tensor(65536.0))  # fmt: skip
    unscaled = g_ref / 65536.0
    assert unscaled.abs().max() < torch.finfo(torch.float16).tiny  # below fp16's normal range before scaling
    # one rounding of the scaled gradient (atol: fp16's subnormal spacing, for gradients that are nearly 0)
    torch.testing.assert_close(g.float(), g_ref, rtol=2e-3, atol=6e-8)
    # what rounding first and scaling afterwards (the one-pass order) would have given: much worse
    one_pass_order = unscaled.half().float() * 65536.0
    assert (one_pass_order - g_ref).abs().max() > 20 * (g.float() - g_ref).abs().max()


@pytest.mark.parametrize("loss", ["patch_weighted_mse", "diffusion_dpo", "patch_dpo"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_wide_offsets_path(loss, layout, monkeypatch):
    """The int64 in-sample offsets (taken for samples beyond 2**31 elements) give the same results."""
    pred, target, ref, weight = _inputs(4, 3, 8, 8, 2, seed=2, layout="channels_last" if layout != "nchw" else "nchw")
    if layout == "sliced":
        pred = torch.randn(4, 6, 8, 16)[:, ::2, :, ::2]

    def run():
        p = pred.detach().requires_grad_(True)  # keeps the layout (clone would make a sliced view contiguous)
        assert p.stride() == pred.stride()
        if loss == "patch_weighted_mse":
            out = patch_weighted_mse(p, target, weight, backend="triton")
        elif loss == "diffusion_dpo":
            out = diffusion_dpo_loss(p, ref, target, beta=2.0, backend="triton")
        else:
            out = patch_dpo_loss(p, ref, target, weight, beta=2.0, backend="triton")
        return out.loss, torch.autograd.grad(out.loss, p)[0]

    loss32, g32 = run()
    monkeypatch.setattr(pl, "_wide", lambda *t: True)
    with record_launches() as rec:
        loss64, g64 = run()
    assert all(x.kwargs["WIDE"] for x in rec.launches if "WIDE" in x.kwargs)
    torch.testing.assert_close(loss64, loss32, rtol=0, atol=0)
    torch.testing.assert_close(g64, g32, rtol=0, atol=0)


def test_tile_override(monkeypatch):
    pred, target, ref, weight = _inputs(4, 3, 10, 12, 2, seed=4)
    base = patch_dpo_loss(pred, ref, target, weight, beta=2.0, backend="torch")
    monkeypatch.setenv("PATCHDPO_FAST_TILE", "2,3,4,4")  # 2 channels per program, 4x4 pixels (3 rounds up to 4)
    assert pl.tile_config(3, 10, 12, pl._LAYOUT_NCHW) == pl.TileConfig(2, 4, 4, 4)
    with record_launches() as rec:
        out = patch_dpo_loss(pred, ref, target, weight, beta=2.0, backend="triton")
    assert rec.launches[0].grid == (2 * 3 * 3, 4)
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-5, atol=1e-6)


def test_batch_limit_is_a_clear_error():
    big = torch.empty(pl.MAX_BATCH + 1, 1, 1, 1, device="meta")
    with pytest.raises(ValueError, match="at most 65535 samples"):
        pl.patch_loss_forward(big, big, None, None, 0.0, False)


def test_scale_gradient_needs_dense_buffer():
    g = torch.ones(4, 8)[:, ::2]
    with pytest.raises(ValueError, match="dense"):
        pl.scale_gradient_(g, torch.tensor(2.0))
    dense = torch.ones(2, 3, 4).transpose(0, 2)  # dense in another dimension order is fine
    pl.scale_gradient_(dense, torch.tensor(2.0))
    assert torch.equal(dense, torch.full_like(dense, 2.0))
