"""Exported adapters load into stock diffusers (same numbers) and back into our models; official .bin loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from patchdpo_fast.models import build_models, read_ip_adapter_file
from patchdpo_fast.models.tiny import build_tiny_components


def _perturb_adapter(models, seed: int = 3) -> None:
    """Move every trainable adapter weight away from its initial value (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _stock_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**build_tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_export_loads_into_stock_diffusers(tmp_path, batch_factory) -> None:
    models = build_models(tiny=True, seed=0, train_resampler=True)
    _perturb_adapter(models)
    out = models.export_ip_adapter(tmp_path / "ip-adapter-plus_patchdpo.safetensors", dtype=torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # atomic write leaves no temp file

    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    n = len(models.ip_unet.ip_processors)
    ip_keys = {f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight" for i in range(n) for kv in "kv"}
    assert {k for k in keys if k.startswith("ip_adapter.")} == ip_keys
    assert {k for k in keys if k.startswith("image_proj.")} == {
        f"image_proj.{k}" for k in models.image_proj.state_dict()
    }
    assert {"image_proj.latents", "image_proj.layers.0.0.to_kv.weight", "image_proj.layers.3.1.3.weight"} <= keys

    pipe = _stock_pipeline(seed=0)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=out.name, local_files_only=True)

    # the stock processors hold exactly our K/V weights, in the same layer order
    stock = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    ours = list(models.ip_unet.ip_processors.values())
    assert len(stock) == len(ours) == n
    for s, o in zip(stock, ours, strict=True):
        assert torch.equal(s.to_k_ip[0].weight, o.to_k_ip.weight)
        assert torch.equal(s.to_v_ip[0].weight, o.to_v_ip.weight)
        assert s.num_tokens == [o.num_tokens]

    # and the stock UNet + adapter predicts the same noise as ours
    batch = batch_factory(models)
    with torch.no_grad():
        ours_eps = models.predict_noise(*batch.args())
        stock_eps = pipe.unet(
            batch.noisy_latents,
            batch.timesteps,
            encoder_hidden_states=batch.prompt_embeds,
            added_cond_kwargs={
                "text_embeds": batch.pooled,
                "time_ids": batch.time_ids,
                "image_embeds": [batch.image_features[:, None]],
            },
        ).sample
    torch.testing.assert_close(stock_eps, ours_eps, rtol=1e-4, atol=1e-5)

    # a stock pipeline call with an image prompt runs
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    latents = pipe(
        "a photo of sks dog",
        ip_adapter_image=image,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_export_load_round_trip(tmp_path, batch_factory) -> None:
    models = build_models(tiny=True, seed=0, train_resampler=True)
    _perturb_adapter(models)
    path = models.export_ip_adapter(tmp_path / "adapter.safetensors", dtype=torch.float32)
    path = models.export_ip_adapter(path, dtype=torch.float32)  # overwriting an existing export works
    half = models.export_ip_adapter(tmp_path / "adapter_fp16.safetensors")  # fp16 is the default
    assert all(v.dtype == torch.float16 for g in read_ip_adapter_file(half).values() for v in g.values())
    assert all(v.dtype == torch.float32 for g in read_ip_adapter_file(path).values() for v in g.values())

    batch = batch_factory(models)
    other = build_models(tiny=True, seed=0, train_resampler=True)  # same frozen parts, initial adapter
    with torch.no_grad():
        expected = models.predict_noise(*batch.args())
        assert not torch.allclose(other.predict_noise(*batch.args()), expected)
        other.load_ip_adapter_weights(path)
        assert torch.equal(other.predict_noise(*batch.args()), expected)
        # loading resets the reference adapter to the loaded weights as well
        assert torch.equal(other.predict_noise(*batch.args(), use_reference=True), expected)

    # building directly from the file gives the same model
    built = build_models(tiny=True, seed=0, ip_adapter_path=path)
    with torch.no_grad():
        assert torch.equal(built.predict_noise(*batch.args()), expected)


def test_official_bin_loads_with_weights_only(tmp_path, batch_factory) -> None:
    models = build_models(tiny=True, seed=0)
    _perturb_adapter(models)
    image_proj, ip_adapter = models.ip_unet.ip_adapter_state_dicts()
    nested = {"image_proj": {k: v.half() for k, v in image_proj.items()}, "ip_adapter": dict(ip_adapter)}
    torch.save(nested, tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")

    built = build_models(tiny=True, seed=0, ip_adapter_path=tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")
    for k, v in built.image_proj.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, image_proj[k].half().float())
    batch = batch_factory(models)
    with torch.no_grad():
        torch.testing.assert_close(
            built.predict_noise(*batch.args()), models.predict_noise(*batch.args()), rtol=1e-2, atol=1e-3
        )

    # a pickle that is not plain tensors is refused (weights_only), never executed
    torch.save({"image_proj": {"latents": _Evil()}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError):
        read_ip_adapter_file(tmp_path / "evil.bin")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary object",))


def test_load_errors(tmp_path) -> None:
    models = build_models(tiny=True, seed=0)
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        models.load_ip_adapter_weights(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        build_models(tiny=True, ip_adapter_path=tmp_path / "missing.bin")
    # an adapter with another resampler shape is rejected with a clear message
    other = build_models(tiny=True, seed=0, num_ip_tokens=4)
    path = other.export_ip_adapter(tmp_path / "four_tokens.safetensors")
    with pytest.raises(ValueError, match="num_queries"):
        models.load_ip_adapter_weights(path)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        models.export_ip_adapter(tmp_path / "adapter.bin")


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
def test_export_dtype_default_is_fp16_and_loads_into_stock_diffusers(tmp_path, dtype, batch_factory) -> None:
    """Adapters export as fp16 by default (the official files' dtype, half the bytes); fp32/bf16 on request."""
    models = build_models(tiny=True, seed=0)
    _perturb_adapter(models)
    kwargs = {} if dtype is None else {"dtype": dtype}
    out = models.export_ip_adapter(tmp_path / "adapter.safetensors", **kwargs)
    want = dtype or torch.float16
    groups = read_ip_adapter_file(out)
    image_proj, ip_adapter = models.ip_unet.ip_adapter_state_dicts()
    for name, theirs in (("image_proj", image_proj), ("ip_adapter", ip_adapter)):
        assert groups[name].keys() == theirs.keys()
        for key, value in groups[name].items():
            assert value.dtype == want and torch.equal(value, theirs[key].to(want)), key
    n_params = sum(v.numel() for v in (*image_proj.values(), *ip_adapter.values()))
    assert out.stat().st_size < n_params * want.itemsize + 64 * 1024  # tensors + header, nothing else

    pipe = _stock_pipeline(seed=0)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=out.name, local_files_only=True)
    stock = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    ours = list(models.ip_unet.ip_processors.values())
    for s, o in zip(stock, ours, strict=True):
        assert torch.equal(s.to_k_ip[0].weight, o.to_k_ip.weight.to(want).float())
    if want == torch.float16:  # rounding the adapter to fp16 barely moves the prediction of the stock UNet
        batch = batch_factory(models)
        with torch.no_grad():
            ours_eps = models.predict_noise(*batch.args())
            stock_eps = pipe.unet(
                batch.noisy_latents, batch.timesteps, encoder_hidden_states=batch.prompt_embeds,
                added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids,
                                   "image_embeds": [batch.image_features[:, None]]},
            ).sample  # fmt: skip
        torch.testing.assert_close(stock_eps, ours_eps, rtol=1e-2, atol=1e-3)
