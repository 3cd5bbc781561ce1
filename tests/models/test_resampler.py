"""The resampler uses the original IP-Adapter-Plus key layout and matches diffusers' converted module."""

from __future__ import annotations

import torch

from patchdpo_fast.models import Resampler, resampler_config_from_state_dict


def _tiny_resampler(seed: int = 0) -> Resampler:
    torch.manual_seed(seed)
    return Resampler(dim=32, depth=4, dim_head=64, heads=2, num_queries=8, embedding_dim=24, output_dim=40, ff_mult=4)


def test_key_layout() -> None:
    sd = _tiny_resampler().state_dict()
    expected = {"latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"}
    expected |= {"norm_out.weight", "norm_out.bias"}
    for i in range(4):
        expected |= {f"layers.{i}.0.{n}.{w}" for n in ("norm1", "norm2") for w in ("weight", "bias")}
        expected |= {f"layers.{i}.0.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
        expected |= {
            f"layers.{i}.1.0.weight",
            f"layers.{i}.1.0.bias",
            f"layers.{i}.1.1.weight",
            f"layers.{i}.1.3.weight",
        }
    assert set(sd) == expected
    assert sd["latents"].shape == (1, 8, 32)
    assert sd["layers.0.0.to_kv.weight"].shape == (2 * 2 * 64, 32)
    assert sd["layers.0.1.1.weight"].shape == (4 * 32, 32)


def test_config_from_state_dict() -> None:
    r = _tiny_resampler()
    assert resampler_config_from_state_dict(r.state_dict()) == r.config


def test_matches_diffusers_ip_adapter_plus_projection() -> None:
    from diffusers import UNet2DConditionModel

    r = _tiny_resampler(1)
    # diffusers' own converter (as used by load_ip_adapter) builds IPAdapterPlusImageProjection from our keys
    unet_stub = UNet2DConditionModel.__new__(UNet2DConditionModel)
    stock = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        unet_stub, r.state_dict(), low_cpu_mem_usage=False
    )
    assert type(stock).__name__ == "IPAdapterPlusImageProjection"
    x = torch.randn(3, 17, 24)
    with torch.no_grad():
        torch.testing.assert_close(r(x), stock(x), rtol=1e-5, atol=1e-5)
    assert r(x).shape == (3, 8, 40)
