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
    assert not any("ref_" in k for k in models.adapter_state_dict())  # checkpoints hold the policy only
    state = {k: v.clone() for k, v in models.adapter_state_dict(include_reference=True).items()}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("ref_image_proj.") for k in state)
    assert any(k.endswith(".ref_k_ip.weight") for k in state)

    fresh = build_models(tiny=True, seed=1, train_resampler=True)
    assert fresh.load_adapter_state_dict(state)  # reference weights were in it and went into the reference
    loaded = fresh.adapter_state_dict(include_reference=True)
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
    # the policy alone is a complete checkpoint; a missing policy key or an unknown key is not
    assert not same_unet.load_adapter_state_dict({k: v for k, v in state.items() if "ref_" not in k})
    with pytest.raises(KeyError, match="missing"):
        same_unet.load_adapter_state_dict({k: v for k, v in state.items() if "to_k_ip" not in k})
    with pytest.raises(KeyError, match="unexpected"):
        same_unet.load_adapter_state_dict({**state, "ip_adapter.999.to_q_ip.weight": torch.zeros(1)})
    # a model without a reference ignores stored reference weights
    no_ref = build_models(tiny=True, seed=0, train_resampler=True, reference=False)
    assert not no_ref.load_adapter_state_dict(state)
    assert no_ref.ip_unet.reference_state_dict() == {}


@pytest.mark.parametrize("train_resampler", [False, True])
def test_reference_is_built_only_when_asked(train_resampler: bool, batch_factory) -> None:
    """Only the DPO losses need the reference: without it no copy of the adapter exists, and asking for it fails."""
    with_ref = build_models(tiny=True, seed=0, train_resampler=train_resampler)
    models = build_models(tiny=True, seed=0, train_resampler=train_resampler, reference=False)
    n_ref = sum(p.numel() for p in with_ref.ip_unet.reference_parameters())
    n_adapter = sum(p.numel() for p in with_ref.trainable_parameters())
    assert n_ref == n_adapter > 0  # the reference is one copy of what trains
    assert models.ip_unet.reference_parameters() == [] and not models.ip_unet.has_reference
    assert not any(".ref_" in n or n.startswith("ref_") for n, _ in models.ip_unet.named_parameters())
    assert models.ip_unet.reference_fingerprint() is None
    all_params = sum(p.numel() for p in models.ip_unet.parameters())
    assert sum(p.numel() for p in with_ref.ip_unet.parameters()) == all_params + n_ref
    batch = batch_factory(models)
    with pytest.raises(RuntimeError, match="no reference adapter"):
        models.predict_noise(*batch.args(), use_reference=True)
    with pytest.raises(RuntimeError, match="no reference adapter"), models.reference_mode():
        pass
    with pytest.raises(RuntimeError, match="no reference adapter"):
        models.sync_reference()
    _train_steps(models, batch, steps=1)  # trains normally without it

    models.ip_unet.enable_reference()  # a copy of the current policy, frozen
    assert sum(p.numel() for p in models.ip_unet.reference_parameters()) == n_adapter
    assert not any(p.requires_grad for p in models.ip_unet.reference_parameters())
    with torch.no_grad():
        assert torch.equal(models.predict_noise(*batch.args(), use_reference=True), models.predict_noise(*batch.args()))
    models.ip_unet.disable_reference()
    assert models.ip_unet.reference_parameters() == []


def test_reference_fingerprint_identifies_the_reference_weights() -> None:
    a = build_models(tiny=True, seed=0, train_resampler=True)
    b = build_models(tiny=True, seed=0, train_resampler=True)
    fp = a.ip_unet.reference_fingerprint()
    assert isinstance(fp, str) and len(fp) == 64 and fp == b.ip_unet.reference_fingerprint()
    _perturb = next(iter(a.ip_unet.ip_processors.values())).ref_v_ip.weight
    with torch.no_grad():
        _perturb[0, 0] += 1e-3
    assert a.ip_unet.reference_fingerprint() != fp
    c = build_models(tiny=True, seed=0, train_resampler=False)  # no resampler copy: another reference
    assert c.ip_unet.reference_fingerprint() != fp
