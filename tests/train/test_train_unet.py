"""Training the UNet itself (model.train_unet) with the reconstruction objective: the pretraining stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchdpo_fast.config import ConfigError, load_config
from patchdpo_fast.models import build_models
from patchdpo_fast.train import train
from patchdpo_fast.training.batch import order_pairs
from patchdpo_fast.training.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def unet_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.on_stale=rebuild",
        "data.procedural.num_pairs=4",
        "model.train_unet=true",
        "model.train_resampler=true",
        "loss.type=reconstruction",
        "optim.lr=1e-3",
        "train.max_steps=6",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=null",
    ]
    return load_config(TINY, [*base, *overrides])


def test_only_the_unet_and_the_adapter_train():
    models = build_models(tiny=True, train_unet=True)
    names = [n for n, _ in models.ip_unet.named_trainable_parameters()]
    assert any(n.startswith("unet.conv_in") for n in names)
    assert any(n.endswith("to_k_ip.weight") for n in names)
    assert not any("ref_k_ip" in n or "ref_v_ip" in n for n in names)
    unet_keys = set(models.ip_unet.unet_state_dict())
    assert unet_keys and not any(".processor." in k for k in unet_keys)
    with pytest.raises(RuntimeError, match="not a frozen reference"):
        models.ip_unet(torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 77, 64), torch.zeros(1, 32),
                       torch.zeros(1, 6), torch.zeros(1, 17, 32), use_reference=True)  # fmt: skip


def test_dpo_losses_with_a_trained_unet_get_a_frozen_reference_unet(tmp_path):
    # model.train_unet is the older spelling of model.trainable=ip_adapter+unet: the DPO losses train against a
    # frozen copy of the initial UNet and adapter (tests/train/test_trainable_modes.py)
    for loss in ("patch_dpo", "diffusion_dpo"):
        cfg = unet_cfg(tmp_path, f"loss.type={loss}")
        assert cfg.model.effective_trainable == "ip_adapter+unet" and cfg.loss.uses_reference_model
    with pytest.raises(ConfigError, match=r"loss\.pair_order"):
        unet_cfg(tmp_path, "loss.pair_order=generated_wins")


def test_reconstruction_learns_exports_a_stock_unet_and_resumes_exactly(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = unet_cfg(tmp_path, "train.max_steps=20", "train.checkpoint_every=10", "data.drop_image=0",
                   "data.drop_text=0", "data.drop_both=0")  # fmt: skip
    result = train(cfg)
    assert result.fixed_batch_loss_end < result.fixed_batch_loss_start
    ckpt = load_file(str(result.last_checkpoint / "unet.safetensors"))
    stock = UNet2DConditionModel.from_pretrained(result.output_dir / "unet", local_files_only=True)
    state = stock.state_dict()
    assert set(state) == set(ckpt)
    assert all(torch.equal(state[k], ckpt[k]) for k in ckpt)
    initial = build_models(tiny=True).ip_unet.unet_state_dict()
    assert not torch.equal(initial["conv_in.weight"], ckpt["conv_in.weight"])  # the UNet did train

    # 20 steps straight == 10 steps, crash, resume for 10 more (UNet, adapter)
    shutil.copytree(result.output_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000020")
    resumed = train(unet_cfg(tmp_path, "train.max_steps=20", "train.checkpoint_every=10", "data.drop_image=0",
                             "data.drop_text=0", "data.drop_both=0", name="resumed"), resume="latest")  # fmt: skip
    got = load_file(str(resumed.last_checkpoint / "unet.safetensors"))
    assert all(torch.equal(got[k], ckpt[k]) for k in ckpt)
    a, b = (load_file(str(p / "adapter.safetensors")) for p in (result.last_checkpoint, resumed.last_checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_the_unet_file_names_it(tmp_path):
    result = train(unet_cfg(tmp_path))
    (result.last_checkpoint / "unet.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: missing"):  # the checkpoint's checksums list it
        train(unet_cfg(tmp_path), resume=str(result.last_checkpoint))


def test_order_pairs():
    lat_ref, lat_gen = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    q_ref, q_gen = torch.full((2, 3, 3), 0.25), torch.full((2, 3, 3), 0.75)
    lat, qw, ql = order_pairs("patch_dpo", "reference_wins", lat_ref, lat_gen, q_ref, q_gen)
    assert torch.equal(lat, torch.cat([lat_ref, lat_gen])) and qw is q_ref and ql is q_gen
    lat, qw, ql = order_pairs("patch_dpo", "generated_wins", lat_ref, lat_gen, q_ref, q_gen)
    assert torch.equal(lat, torch.cat([lat_gen, lat_ref])) and qw is q_gen and ql is q_ref
    lat, _, _ = order_pairs("reconstruction", "reference_wins", lat_ref, lat_gen, q_ref, q_gen)
    assert lat is lat_gen
    with pytest.raises(ValueError, match="pair_order"):
        order_pairs("mse", "sideways", lat_ref, lat_gen, q_ref, q_gen)


def test_training_drops_the_image_prompt_as_generation_does(tmp_path):
    """Image-prompt dropout in training and the unconditional branch of generation use the same features."""
    from patchdpo_fast.data import CachedPairDataset

    models = build_models(tiny=True)
    train(unet_cfg(tmp_path, "train.max_steps=1", "model.train_unet=false", "loss.type=mse"))
    null = CachedPairDataset(tmp_path / "cache").null_conditioning()
    assert torch.allclose(null["image_features"], models.null_image_features(), atol=1e-6)


def test_sample_grids_before_and_after_training(tmp_path):
    """samples.references + prompts: a grid (reference, then one sample per prompt) at step 0 and at the end."""
    from PIL import Image

    refs = tmp_path / "refs"
    for name, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (refs / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), color).save(refs / name / "ref.png")
    opts = ["model.train_unet=false", "loss.type=mse", f"samples.references={refs}", "samples.steps=2"]
    cfg = unet_cfg(tmp_path, "train.max_steps=2", *opts, "samples.prompts=[a dog, a cat on the beach]")
    result = train(cfg)
    grids = sorted((result.output_dir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_00000000.png", "step_00000002.png"]
    with Image.open(grids[0]) as img:
        cell = 96 + 2  # 64 px images are shown at least 96 px wide, 2 px apart
        assert img.size == (3 * cell + 2, 2 * cell + 2)  # 2 references x (reference + 2 prompts)
        first, second = img.getpixel((2 + 10, 2 + 10)), img.getpixel((2 + 10, cell + 2 + 10))
        assert first[2] > 150 > first[0] and second[0] > 150 > second[2]  # rows by subject name: blue, then red
    with pytest.raises(ConfigError, match=r"samples\.prompts"):
        unet_cfg(tmp_path, f"samples.references={refs}")
