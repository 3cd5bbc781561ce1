"""SD1.5-class UNets: the layout is read from the UNet's config, adapters export to stock diffusers' SD1.5 pipeline,
and an adapter of the other family is refused with an error naming both layouts."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.models import (
    IPAdapterUNet,
    Resampler,
    build_models,
    cross_attention_processor_names,
    default_resampler_config,
    read_ip_adapter_file,
)
from patchdpo_fast.models.sd15_config import SD15_NUM_IP_LAYERS, SD15_UNET, SD15_UNET_PARAMETERS
from patchdpo_fast.models.tiny import build_tiny_components


def _perturb(models, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_tiny_sd15_conditioning_follows_the_unet_config(batch_factory) -> None:
    models = build_models(tiny=True, seed=0, tiny_architecture="sd15")
    assert models.unet.config.addition_embed_type is None and not models.added_conditioning
    assert models.text_encoder_2 is None and models.tokenizer_2 is None
    embeds, pooled = models.encode_prompts(["a photo of sks dog", "a red toy"])
    assert pooled is None and embeds.shape == (2, 77, models.unet.config.cross_attention_dim)
    # the text encoder's last hidden state (after the final layer norm), as StableDiffusionPipeline encodes prompts
    ids = models.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(embeds[:1], models.text_encoder(ids).last_hidden_state)
    assert models.add_time_ids(2, 64) is None
    n = len(models.ip_unet.ip_processors)
    assert n == len(cross_attention_processor_names(models.unet)) == 6
    # SD1.5 takes no added conditioning: whatever is passed as pooled/time ids is ignored
    batch = batch_factory(models)
    with torch.no_grad():
        eps = models.predict_noise(*batch.args())
        other = models.predict_noise(batch.noisy_latents, batch.timesteps, batch.prompt_embeds, torch.randn(2, 7),
                                     torch.randn(2, 3), batch.image_features)  # fmt: skip
        assert torch.equal(eps, other)
    sdxl = build_models(tiny=True, seed=0)
    assert sdxl.added_conditioning and sdxl.encode_prompts(["a dog"])[1] is not None


def test_real_scale_sd15_layout_is_the_official_ip_adapter_plus_sd15() -> None:
    """On the meta device (nothing allocated): the SD1.5 UNet config gives ip-adapter-plus_sd15's keys and shapes."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMETERS
        cfg = default_resampler_config(unet, embedding_dim=1280, num_ip_tokens=16)  # ViT-H/14 features
        assert cfg == {"dim": 768, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 16,
                       "embedding_dim": 1280, "output_dim": 768, "ff_mult": 4}  # fmt: skip
        ip_unet = IPAdapterUNet(unet, Resampler(**cfg), reference=False)
    image_proj, ip_adapter = ip_unet.ip_adapter_state_dicts()
    assert len(ip_unet.ip_processors) == SD15_NUM_IP_LAYERS
    assert set(ip_adapter) == {f"{k}.to_{kv}_ip.weight" for k in range(1, 32, 2) for kv in "kv"}
    shapes = {k: tuple(v.shape) for k, v in image_proj.items()}
    assert shapes["latents"] == (1, 16, 768)
    assert shapes["proj_in.weight"] == (768, 1280)
    assert shapes["layers.0.0.to_q.weight"] == (768, 768) and shapes["layers.0.0.to_kv.weight"] == (1536, 768)
    assert shapes["layers.3.1.1.weight"] == (3072, 768) and shapes["proj_out.weight"] == (768, 768)
    assert "layers.4.0.to_q.weight" not in shapes
    # K/V read the 768-wide tokens; their widths follow the blocks (320 outermost, the mid block 1280 last)
    assert tuple(ip_adapter["1.to_k_ip.weight"].shape) == (320, 768)
    assert tuple(ip_adapter["31.to_v_ip.weight"].shape) == (1280, 768)


def _stock_sd15_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **build_tiny_components(seed, "sd15"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sd15_export_loads_into_stock_stable_diffusion_pipeline(tmp_path, batch_factory, dtype) -> None:
    models = build_models(tiny=True, seed=0, tiny_architecture="sd15", train_resampler=True)
    _perturb(models)
    out = models.export_ip_adapter(tmp_path / "ip-adapter-plus_sd15_patchdpo.safetensors", dtype=dtype)
    pipe = _stock_sd15_pipeline(seed=0)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=out.name, local_files_only=True)

    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection)
    stock = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    ours = list(models.ip_unet.ip_processors.values())
    assert len(stock) == len(ours) == 6
    for s, o in zip(stock, ours, strict=True):
        assert torch.equal(s.to_k_ip[0].weight, o.to_k_ip.weight.to(dtype).float())
        assert torch.equal(s.to_v_ip[0].weight, o.to_v_ip.weight.to(dtype).float())

    batch = batch_factory(models)
    assert batch.pooled is None and batch.time_ids is None
    with torch.no_grad():
        ours_eps = models.predict_noise(*batch.args())
        stock_eps = pipe.unet(
            batch.noisy_latents,
            batch.timesteps,
            encoder_hidden_states=batch.prompt_embeds,
            added_cond_kwargs={"image_embeds": [batch.image_features[:, None]]},
        ).sample
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(stock_eps, ours_eps, **tol)
    if dtype == torch.float32:
        assert not torch.allclose(stock_eps, _stock_sd15_pipeline(0).unet(
            batch.noisy_latents, batch.timesteps, encoder_hidden_states=batch.prompt_embeds).sample)  # fmt: skip

    # and back into our SD1.5 model, bit for bit (fp32)
    if dtype == torch.float32:
        built = build_models(tiny=True, seed=0, tiny_architecture="sd15", ip_adapter_path=out)
        with torch.no_grad():
            assert torch.equal(built.predict_noise(*batch.args()), ours_eps)


def test_sd15_pipeline_generates_with_the_training_model() -> None:
    from diffusers import StableDiffusionPipeline

    from patchdpo_fast.generation import build_pipeline, generate

    models = build_models(tiny=True, seed=0, tiny_architecture="sd15")
    pipe = build_pipeline(models, scheduler="ddim")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.unet is models.unet
    g = torch.Generator().manual_seed(0)
    out = generate(pipe, [torch.rand(3, 40, 40, generator=g)], ["a dog", "a cat"], steps=2, resolution=64,
                   guidance=3.0, output_type="pt")  # fmt: skip
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_an_adapter_of_the_other_family_is_refused_naming_both_layouts(tmp_path) -> None:
    sdxl = build_models(tiny=True, seed=0)
    sdxl_file = sdxl.export_ip_adapter(tmp_path / "ip-adapter-plus_sdxl.safetensors")
    sd15 = build_models(tiny=True, seed=0, tiny_architecture="sd15")
    sd15_file = sd15.export_ip_adapter(tmp_path / "ip-adapter-plus_sd15.safetensors")

    pattern = r"ip-adapter-plus_sdxl\.safetensors does not fit this UNet: .*cross_attention_dim 64.* with 12 IP .*" \
              r"the UNet has cross_attention_dim 32, 6 cross-attention layers \(SD1\.5-class"  # fmt: skip
    with pytest.raises(ValueError, match=pattern):
        build_models(tiny=True, seed=0, tiny_architecture="sd15", ip_adapter_path=sdxl_file)
    with pytest.raises(ValueError, match=pattern):
        sd15.load_ip_adapter_weights(sdxl_file)
    with pytest.raises(ValueError, match=r"cross_attention_dim 32 .*the UNet has cross_attention_dim 64.*SDXL-class"):
        sdxl.load_ip_adapter_weights(sd15_file)
    # a file of the right family but with a layer missing names the count too
    groups = read_ip_adapter_file(sd15_file)
    del groups["ip_adapter"]["11.to_k_ip.weight"], groups["ip_adapter"]["11.to_v_ip.weight"]
    with pytest.raises(ValueError, match="with 5 IP cross-attention layers"):
        sd15.load_ip_adapter_weights(groups)


def test_text_encoders_of_another_width_are_refused(tmp_path) -> None:
    """A base-model folder whose text encoder does not produce the UNet's cross-attention width: one clear error."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from patchdpo_fast.models.tiny import TINY_SD15_UNET

    comps = build_tiny_components(0, "sd15")
    comps["unet"] = UNet2DConditionModel(**{**TINY_SD15_UNET, "cross_attention_dim": 48})
    StableDiffusionPipeline(**comps, safety_checker=None, requires_safety_checker=False).save_pretrained(tmp_path / "m")
    comps["image_encoder"].save_pretrained(tmp_path / "img")
    with pytest.raises(ValueError, match="width 32 = 32, but the UNet's cross_attention_dim is 48"):
        build_models(pretrained_model_path=tmp_path / "m", image_encoder_path=tmp_path / "img")


def test_sd15_folder_builds_like_the_tiny_model(tmp_path, batch_factory) -> None:
    """A saved SD1.5-layout folder (no text_encoder_2/, tokenizer_2/) loads; the UNet config picks the SD1.5 path."""
    from diffusers import StableDiffusionPipeline

    comps = build_tiny_components(0, "sd15")
    image_encoder = comps.pop("image_encoder")
    StableDiffusionPipeline(**comps, safety_checker=None, requires_safety_checker=False).save_pretrained(tmp_path / "m")
    image_encoder.save_pretrained(tmp_path / "img")
    assert not (tmp_path / "m" / "text_encoder_2").exists()
    loaded = build_models(pretrained_model_path=tmp_path / "m", image_encoder_path=tmp_path / "img")
    assert loaded.text_encoder_2 is None and not loaded.added_conditioning
    cfg = loaded.image_proj.config  # the SD1.5 rule: width = cross_attention_dim, one head of 64 per 64 channels
    assert (cfg["dim"], cfg["heads"], cfg["output_dim"]) == (32, 1, 32)
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"
    tiny = build_models(tiny=True, seed=0, tiny_architecture="sd15")
    for a, b in zip(batch_factory(tiny).args(), batch_factory(loaded).args(), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    v = build_models(pretrained_model_path=tmp_path / "m", image_encoder_path=tmp_path / "img",
                     prediction_type="v_prediction")  # fmt: skip
    assert v.noise_scheduler.config.prediction_type == "v_prediction"


def test_no_adapter_model_is_the_plain_base_unet(batch_factory) -> None:
    """use_ip_adapter=False: every attention layer is plain and the prediction is the stock UNet's on text alone."""
    from patchdpo_fast.models.tiny import build_tiny_components

    models = build_models(tiny=True, seed=0, tiny_architecture="sd15", use_ip_adapter=False, train_adapter=False)
    assert models.image_encoder is None and models.image_proj is None and not models.ip_unet.ip_processors
    assert models.adapter_state_dict() == {} and models.num_ip_tokens == 0
    with pytest.raises(RuntimeError, match="no IP-Adapter"):
        models.export_ip_adapter("x.safetensors")
    with pytest.raises(RuntimeError, match="no IP-Adapter and so no image encoder"):
        models.null_image_features()
    stock = build_tiny_components(0, "sd15")["unet"]
    with_adapter = build_models(tiny=True, seed=0, tiny_architecture="sd15")
    batch = batch_factory(with_adapter)
    with torch.no_grad():
        ours = models.predict_noise(batch.noisy_latents, batch.timesteps, batch.prompt_embeds, None, None, None)
        theirs = stock(batch.noisy_latents, batch.timesteps, encoder_hidden_states=batch.prompt_embeds).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
