"""The UNet LoRA (model.trainable=unet_lora): peft through diffusers' add_adapter, inside the IP processors; the
LoRA-off reference; the diffusers LoRA export that stock ``load_lora_weights`` reads."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.models import build_models
from patchdpo_fast.models.attention import IPAttnProcessor
from patchdpo_fast.models.tiny import build_tiny_components
from patchdpo_fast.ops import patch_dpo_loss
from patchdpo_fast.training.export import LORA_WEIGHT_NAME, write_unet_lora

pytest.importorskip("peft")


def _lora_models(rank: int = 4, alpha: float | None = None, train_adapter: bool = False):
    models = build_models(tiny=True, seed=0, train_adapter=train_adapter, reference=train_adapter)
    models.ip_unet.add_unet_lora(rank, alpha)
    return models


def _perturb_lora(models, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in models.ip_unet.unet_lora_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_lora_wraps_the_attention_projections_and_keeps_the_ip_processors(batch_factory):
    from peft.tuners.lora import LoraLayer

    base = build_models(tiny=True, seed=0, train_adapter=False, reference=False)
    models = _lora_models()
    unet = models.ip_unet.unet
    wrapped = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in wrapped)
    assert not any("processor" in n for n in wrapped)  # the IP adapter's own to_k_ip / to_v_ip are no targets
    assert sum(isinstance(p, IPAttnProcessor) for p in unet.attn_processors.values()) == len(
        models.ip_unet.ip_processors
    )
    # only the LoRA trains; the adapter is frozen
    trainable = [n for n, _ in models.ip_unet.named_trainable_parameters()]
    assert trainable and all(".lora_" in n for n in trainable)

    batch = batch_factory(models)
    with torch.no_grad():
        eps_base = base.predict_noise(*batch.args())
        eps_step0 = models.predict_noise(*batch.args())
    assert torch.equal(eps_step0, eps_base)  # B = 0: the LoRA model is the base UNet at step 0
    _perturb_lora(models)
    with torch.no_grad():
        eps_lora = models.predict_noise(*batch.args())
        eps_off = models.predict_noise(*batch.args(), use_reference=True)
    # the LoRA acts (every attention layer goes through the wrapped projections, the IP cross-attentions included)
    assert (eps_lora - eps_base).abs().max() > 1e-3
    assert torch.equal(eps_off, eps_base)  # switched off: the base UNet, bit for bit
    assert all(p.requires_grad for _, p in models.ip_unet.unet_lora_parameters())  # the toggle keeps them trainable


def test_lora_in_the_ip_cross_attention_changes_the_image_branch_too(batch_factory):
    # a LoRA on to_q only in the IP cross-attention layers: the IP processor must call the wrapped to_q
    models = build_models(tiny=True, seed=0, train_adapter=False, reference=False)
    models.ip_unet.add_unet_lora(4, target_modules=["attn2.to_q"])
    _perturb_lora(models)
    batch = batch_factory(models)
    with torch.no_grad():
        on = models.predict_noise(*batch.args())
        assert not torch.equal(on, models.predict_noise(*batch.args(), use_reference=True))


def test_step0_patch_dpo_log_ratio_is_exactly_zero(batch_factory):
    models = _lora_models(train_adapter=True)  # adapter + LoRA: the reference is the initial adapter, LoRA off
    batch = batch_factory(models, batch=4)
    target = torch.randn(batch.noisy_latents.shape, generator=torch.Generator().manual_seed(5))
    weight = torch.rand(4, *batch.noisy_latents.shape[-2:], generator=torch.Generator().manual_seed(6))
    pred = models.predict_noise(*batch.args())
    ref = models.predict_noise(*batch.args(), use_reference=True)
    out = patch_dpo_loss(pred, ref, target, weight, beta=5000.0)
    assert torch.equal(out.log_ratio, torch.zeros_like(out.log_ratio))
    assert float(out.loss.detach()) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=0)
    out.loss.backward()  # the gradient reaches the LoRA and the adapter (B = 0: only B gets one at step 0)
    grads = {n: p.grad for n, p in models.ip_unet.named_trainable_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "to_k_ip" in n)


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_exported_lora_loads_into_a_stock_pipeline_and_reproduces_the_prediction(tmp_path, batch_factory, alpha):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    models = _lora_models(rank=4, alpha=alpha)
    _perturb_lora(models)
    models.export_ip_adapter(tmp_path / "ip_adapter.safetensors", dtype=torch.float32)
    folder = write_unet_lora(models.ip_unet, tmp_path / "unet_lora", dtype=torch.float32)
    assert sorted(p.name for p in folder.iterdir()) == [LORA_WEIGHT_NAME]
    assert all(k.startswith("unet.") for k in load_file(str(folder / LORA_WEIGHT_NAME)))

    pipe = StableDiffusionXLPipeline(**build_tiny_components(0))
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", local_files_only=True)
    pipe.load_lora_weights(str(folder))  # stock diffusers, the folder as it is
    batch = batch_factory(models)
    with torch.no_grad():
        ours = models.predict_noise(*batch.args())
        stock = pipe.unet(
            batch.noisy_latents,
            batch.timesteps,
            encoder_hidden_states=batch.prompt_embeds,
            added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids,
                               "image_embeds": [batch.image_features[:, None]]},
        ).sample  # fmt: skip
        base = models.predict_noise(*batch.args(), use_reference=True)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters for this prediction
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)


def test_lora_export_dtype_defaults_to_fp16(tmp_path):
    from safetensors.torch import load_file

    models = _lora_models()
    folder = write_unet_lora(models.ip_unet, tmp_path / "lora")
    tensors = load_file(str(folder / LORA_WEIGHT_NAME))
    assert tensors and all(v.dtype == torch.float16 for v in tensors.values())


def test_lora_state_dict_round_trip_and_errors():
    models = _lora_models()
    _perturb_lora(models)
    state = {k: v.clone() for k, v in models.ip_unet.unet_lora_state_dict().items()}
    other = _lora_models()
    other.ip_unet.load_unet_lora_state_dict(state)
    assert all(torch.equal(other.ip_unet.unet_lora_state_dict()[k], v) for k, v in state.items())
    with pytest.raises(KeyError, match="missing"):
        other.ip_unet.load_unet_lora_state_dict(dict(list(state.items())[1:]))
    with pytest.raises(RuntimeError, match="already has a LoRA"):
        other.ip_unet.add_unet_lora(4)
    with pytest.raises(ValueError, match="target_modules"):
        build_models(tiny=True, train_adapter=False, reference=False).ip_unet.add_unet_lora(4, target_modules=["nope"])
