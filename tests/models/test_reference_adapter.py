"""The DPO reference is a frozen copy of the adapter weights only; only the intended parameters train."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.models import build_models


def _train_steps(models, batch, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(models.trainable_parameters(), lr=lr, weight_decay=0.0)
    target = torch.randn(batch.noisy_latents.shape, generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        eps = models.predict_noise(*batch.args())
        loss = torch.nn.functional.mse_loss(eps.float(), target)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("train_resampler", [False, True])
def test_only_intended_parameters_train(train_resampler: bool) -> None:
    models = build_models(tiny=True, seed=0, train_resampler=train_resampler)
    names = [n for n, _ in models.ip_unet.named_trainable_parameters()]
    kv = [n for n in names if n.endswith((".to_k_ip.weight", ".to_v_ip.weight"))]
    assert len(kv) == 2 * len(models.ip_unet.ip_processors) > 0
    resampler = [n for n in names if n.startswith("image_proj.")]
    assert set(names) == set(kv) | set(resampler)
    expected_resampler = {f"image_proj.{n}" for n, _ in models.image_proj.named_parameters()}
    assert set(resampler) == (expected_resampler if train_resampler else set())
    assert not any(".ref_" in n or n.startswith("ref_image_proj") for n in names)
    # reference copies are frozen and exist for the resampler only when it trains
    assert (models.ip_unet.ref_image_proj is not None) == train_resampler
    for proc in models.ip_unet.ip_processors.values():
        assert not proc.ref_k_ip.weight.requires_grad and not proc.ref_v_ip.weight.requires_grad
    for module in (models.vae, models.text_encoder, models.text_encoder_2, models.image_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    unet_trainable = [n for n, p in models.unet.named_parameters() if p.requires_grad]
    assert all(n.endswith((".to_k_ip.weight", ".to_v_ip.weight")) for n in unet_trainable)
    assert {id(p) for p in models.trainable_parameters()} == {
        id(p) for _, p in models.ip_unet.named_trainable_parameters()
    }


@pytest.mark.parametrize("train_resampler", [False, True])
def test_reference_frozen_while_policy_trains(train_resampler: bool, batch_factory) -> None:
    models = build_models(tiny=True, seed=0, train_resampler=train_resampler)
    batch = batch_factory(models)
    with torch.no_grad():
        policy0 = models.predict_noise(*batch.args())
    ref0 = models.predict_noise(*batch.args(), use_reference=True)
    assert not ref0.requires_grad  # the reference never builds a graph
    assert torch.equal(policy0, ref0)

    _train_steps(models, batch)

    with torch.no_grad():
        policy1 = models.predict_noise(*batch.args())
    ref1 = models.predict_noise(*batch.args(), use_reference=True)
    assert (policy1 - policy0).abs().max() > 1e-4
    assert torch.equal(ref1, ref0)
    with models.reference_mode():  # the context manager selects the reference for implicit calls
        assert torch.equal(models.predict_noise(*batch.args()), ref0)
        # ... and switches the processors themselves, e.g. for a direct UNet call
        ehs = torch.cat([batch.prompt_embeds, models.ip_unet.ip_tokens(batch.image_features, use_reference=True)], 1)
        with torch.no_grad():
            direct = models.unet(
                batch.noisy_latents,
                batch.timesteps,
                encoder_hidden_states=ehs,
                added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
            ).sample
        assert torch.equal(direct, ref0)
    assert torch.equal(models.predict_noise(*batch.args()), policy1)

    models.sync_reference()
    assert torch.equal(models.predict_noise(*batch.args(), use_reference=True), policy1)


def test_adapter_state_dict_round_trip(batch_factory) -> None:
    models = build_models(tiny=True, seed=0, train_resampler=True)
    batch = batch_factory(models)
    _train_steps(models, batch, steps=2)
    state = {k: v.clone() for k, v in models.adapter_state_dict().items()}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("ref_image_proj.") for k in state)
    assert any(k.endswith(".ref_k_ip.weight") for k in state)

    fresh = build_models(tiny=True, seed=1, train_resampler=True)
    fresh.load_adapter_state_dict(state)
    loaded = fresh.adapter_state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # outputs match when the frozen UNet is the same one (same seed)
    same_unet = build_models(tiny=True, seed=0, train_resampler=True)
    same_unet.load_adapter_state_dict(state)
    with torch.no_grad():
        for use_ref in (False, True):
            torch.testing.assert_close(
                same_unet.predict_noise(*batch.args(), use_reference=use_ref),
                models.predict_noise(*batch.args(), use_reference=use_ref),
                rtol=0,
                atol=0,
            )
    with pytest.raises(KeyError, match="missing"):
        same_unet.load_adapter_state_dict({k: v for k, v in state.items() if "ref_" not in k})
