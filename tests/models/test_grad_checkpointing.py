"""Gradient checkpointing in the frozen UNet gives the same adapter gradients as without it."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.models import build_models


def _grads(models, batch, with_reference: bool) -> dict[str, torch.Tensor]:
    models.ip_unet.train()
    eps = models.predict_noise(*batch.args())
    if with_reference:  # a DPO step runs the reference between the policy forward and the backward
        ref = models.predict_noise(*batch.args(), use_reference=True)
        loss = (eps.float() - ref.float() + 0.1).square().mean()
    else:
        loss = eps.float().square().mean()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in models.ip_unet.named_trainable_parameters()}


@pytest.mark.parametrize(("train_resampler", "with_reference"), [(False, False), (True, True)])
def test_checkpointing_same_gradients(train_resampler: bool, with_reference: bool, batch_factory) -> None:
    plain = build_models(tiny=True, seed=0, train_resampler=train_resampler)
    ckpt = build_models(tiny=True, seed=0, train_resampler=train_resampler, gradient_checkpointing=True)
    assert ckpt.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    with torch.no_grad():  # make policy != reference so the reference forward matters
        for p, q in zip(plain.trainable_parameters(), ckpt.trainable_parameters(), strict=True):
            delta = 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
            p.add_(delta)
            q.add_(delta)
    batch = batch_factory(plain)

    calls = 0
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    try:
        g_ckpt = _grads(ckpt, batch, with_reference)
    finally:
        mp.undo()
    assert calls > 0  # checkpointing really ran
    g_plain = _grads(plain, batch, with_reference)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 0
    assert any(k.startswith("image_proj.") for k in g_plain) == train_resampler
    for name in g_plain:
        assert g_plain[name].abs().sum() > 0, name
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
