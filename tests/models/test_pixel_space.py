"""The pixel-space autoencoder: an exact space-to-depth fold with AutoencoderKL's interface."""

from __future__ import annotations

import pytest
import torch

from patchdpo_fast.models import build_models
from patchdpo_fast.models.pixel_space import PixelSpaceAutoencoder, is_pixel_space_folder


@pytest.mark.parametrize("f", [1, 2, 4])
def test_round_trip_is_exact_and_shapes_follow_the_factor(f):
    vae = PixelSpaceAutoencoder(downsample=f, scaling_factor=0.5)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    assert z.shape == (2, 3 * f * f, 16 // f, 24 // f)
    assert torch.equal(vae.encode(x).latent_dist.mode(), z)  # a point posterior
    assert torch.equal(vae.decode(z).sample, x)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == f  # the pipelines' vae_scale_factor


def test_latents_are_scaled_pixels():
    vae = PixelSpaceAutoencoder(downsample=2, scaling_factor=0.5)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    z = vae.encode(x).latent_dist.mode()
    assert torch.equal(z[0, :4, 0, 0], 0.5 * x[0, 0, :2, :2].flatten())  # the 2x2 block of channel 0


def test_bad_inputs_are_named():
    vae = PixelSpaceAutoencoder(downsample=2)
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 12, h, w\)"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        PixelSpaceAutoencoder(downsample=3)


def test_folder_round_trip(tmp_path):
    PixelSpaceAutoencoder(downsample=4, scaling_factor=0.7).save_pretrained(tmp_path / "vae")
    assert is_pixel_space_folder(tmp_path / "vae")
    assert not is_pixel_space_folder(tmp_path)
    loaded = PixelSpaceAutoencoder.from_config(PixelSpaceAutoencoder.load_config(tmp_path / "vae"))
    assert loaded.config.downsample == 4 and loaded.config.scaling_factor == 0.7
    assert list((tmp_path / "vae").iterdir()) == [tmp_path / "vae" / "config.json"]  # no weights


def test_model_bundle_encodes_and_decodes_through_it():
    models = build_models(tiny=True)
    models.vae = PixelSpaceAutoencoder(downsample=2)
    assert models.vae_scale_factor == 2
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = models.encode_images(pixels)
    assert latents.shape == (2, 12, 8, 8)
    assert torch.equal(models.decode_latents(latents), pixels)
