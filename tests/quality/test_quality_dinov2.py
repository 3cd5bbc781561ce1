"""The DINOv2 path end to end on a small random DINOv2 config: quality-train -> folder -> estimate -> quality-eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from quality_helpers import synthetic_photos

from patchdpo_fast.quality import PatchQualityEstimator
from patchdpo_fast.quality.evaluate import main as eval_main
from patchdpo_fast.quality.train_backbone import main as train_main


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A plain transformers DINOv2 folder (random weights, 64 px input, 8 px patches -> an 8 x 8 grid)."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("dino")
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=64
    )
    torch.manual_seed(0)
    Dinov2Model(cfg).save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 64, "width": 64}}))
    return root


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(synthetic_photos(4, size=64, seed=2)):
        sub = root / ("alpha" if i < 2 else "beta")
        sub.mkdir(exist_ok=True)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(sub / f"{i}.png")
    return root


def test_dinov2_trains_end_to_end(dino_folder, photo_dir, tmp_path):
    before = PatchQualityEstimator.from_pretrained(dino_folder)
    assert before.backbone.config.model_type == "dinov2" and before.grid_size == (8, 8)
    out = tmp_path / "q"
    args = ["--images", str(photo_dir), "--backbone", str(dino_folder), "--out", str(out), "--minutes", "0.02"]
    assert train_main([*args, "--batch-size", "2", "--lr", "1e-3", "--no-progress"]) == 0
    cfg = json.loads((out / "quality_config.json").read_text())
    assert cfg["extra"]["training"]["backbone"] == str(dino_folder) and cfg["extra"]["training"]["step"] >= 1
    after = PatchQualityEstimator.from_pretrained(out)
    assert after.backbone.config.model_type == "dinov2" and after.grid_size == (8, 8)
    assert after.image_size == (64, 64) and after.backbone.config.hidden_size == 32
    # the weights were trained (every parameter that gets a gradient moved), the folder holds only safetensors/JSON
    old, new = before.backbone.state_dict(), after.backbone.state_dict()
    moved = [k for k in old if not torch.equal(old[k], new[k])]
    assert "embeddings.patch_embeddings.projection.weight" in moved and len(moved) > len(old) // 2
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    x = synthetic_photos(2, size=64, seed=3)
    maps = after.estimate(x, x)
    torch.testing.assert_close(maps.generated_similarity, torch.ones(2, 8, 8), atol=1e-4, rtol=0)
    res_file = tmp_path / "eval.json"
    assert eval_main(["--images", str(photo_dir), "--estimator", str(out), "--all-subjects", "--pairs", "1",
                      "--out", str(res_file)]) == 0  # fmt: skip
    res = json.loads(res_file.read_text())
    assert res["grid"] == [8, 8] and res["baseline"]["overall"]["patches"] == res["overall"]["patches"]
