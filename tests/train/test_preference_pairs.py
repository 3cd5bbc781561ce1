"""Plain preference pairs (Pick-a-Pic-like: prompt, winner, loser; no reference photo) train the UNet or a LoRA on it
with model.use_ip_adapter=false (text-only conditioning), and are refused where an IP-Adapter would need a reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from patchdpo_fast.config import ConfigError, load_config
from patchdpo_fast.data.manifest import Manifest, ManifestError, ManifestRecord
from patchdpo_fast.errors import UserError
from patchdpo_fast.train import train

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
PHOTOS = REPO.parent / "shared" / "data" / "dreambench256"
if not PHOTOS.is_dir():  # the worktree sits next to /work/shared
    PHOTOS = Path("/work/shared/data/dreambench256")


def preference_manifest(folder: Path, n: int = 4) -> Path:
    """Pick-a-Pic-like pairs from real photos: for one prompt, a photo of the subject wins over another subject's."""
    subjects = ["dog", "cat", "backpack", "can", "bear_plushie"]
    lines = [{"format": "patchdpo-manifest", "version": 1, "source": "test preference pairs"}]
    for i in range(n):
        win, lose = subjects[i % len(subjects)], subjects[(i + 1) % len(subjects)]
        lines.append({"id": f"pap/{i:04d}", "prompt": f"a photo of a {win.replace('_', ' ')}",
                      "winner": str(PHOTOS / win / "00.jpg"), "loser": str(PHOTOS / lose / "01.jpg")})  # fmt: skip
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _cfg(tmp_path: Path, manifest: Path, *overrides: str):
    return load_config(TINY, [
        "data.source=manifest", f"data.manifest_path={manifest}", "data.missing_maps=uniform",
        "model.use_ip_adapter=false", "model.trainable=unet_lora", "model.lora.rank=4",
        "loss.type=diffusion_dpo", "loss.beta=200", "optim.lr=1e-3", "optim.warmup_steps=0",
        "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", f"train.output_dir={tmp_path / 'run'}",
        f"cache.dir={tmp_path / 'cache'}", *overrides,
    ], check_paths=False)  # fmt: skip


def test_preference_records_read_validate_and_round_trip(tmp_path) -> None:
    path = preference_manifest(tmp_path)
    manifest = Manifest.load(path, check="full")
    pairs = manifest.pairs()
    assert len(pairs) == 4 and all(p.preference and not p.has_maps for p in pairs)
    assert pairs[0].reference == PHOTOS / "dog" / "00.jpg" and pairs[0].generated == PHOTOS / "cat" / "01.jpg"
    assert manifest.records[0].subject == "" and manifest.records[0].kind == "preference"
    out = manifest.save(tmp_path / "copy" / "manifest.jsonl")
    again = Manifest.load(out)
    assert [r.to_json() for r in again.records] == [r.to_json() for r in manifest.records]
    assert set(json.loads(out.read_text().splitlines()[1])) == {"id", "prompt", "winner", "loser"}
    built = ManifestRecord.preference("x", "a dog", "w.jpg", "l.jpg")
    assert built.to_json() == {"id": "x", "prompt": "a dog", "winner": "w.jpg", "loser": "l.jpg"}

    bad = tmp_path / "bad.jsonl"
    rows = [{"format": "patchdpo-manifest", "version": 1},
            {"id": "a", "prompt": "p", "winner": str(PHOTOS / "dog" / "00.jpg")},
            {"id": "b", "prompt": "p", "winner": "w.jpg", "loser": "l.jpg", "reference": "r.jpg"},
            {"id": "c", "prompt": "p", "winner": str(PHOTOS / "dog" / "00.jpg"), "loser": "nope.jpg"}]  # fmt: skip
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError) as info:
        Manifest.load(bad)
    text = str(info.value)
    assert "line 2 (id 'a'): missing field(s) ['loser']" in text
    assert "line 3 (id 'b'): a preference record (winner/loser) has no ['reference']" in text
    assert "line 4 (id 'c'): missing file: loser 'nope.jpg'" in text


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_unet_lora_loss_falls_on_a_fixed_batch_of_preference_pairs(tmp_path, arch) -> None:
    from patchdpo_fast.data import build_pair_dataset
    from patchdpo_fast.training.batch import draw_pair_noise
    from patchdpo_fast.training.build import build_engine, build_models
    from patchdpo_fast.training.distributed import DistEnv
    from patchdpo_fast.training.inputs import ModelInputs, collate
    from patchdpo_fast.training.step import forward_loss
    from patchdpo_fast.training.trainable import setup_trainable

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    cfg = _cfg(tmp_path, preference_manifest(tmp_path, n=2), f"model.tiny_architecture={arch}", "cache.enabled=false",
               "data.drop_image=0", "data.drop_text=0", "data.drop_both=0")  # fmt: skip
    torch.manual_seed(0)
    models = build_models(cfg, env)
    engine = build_engine(cfg, models, env, setup_trainable(cfg, models))
    inputs = ModelInputs(cfg, models, env, None)
    dataset = build_pair_dataset(cfg.data, needs_quality=False)
    x = inputs(collate([dataset[0], dataset[1]]), 0)
    assert x["feats"] is None  # text-only conditioning
    rnd = draw_pair_noise(0, 0, [0, 1], tuple(x["lat_ref"].shape[1:]), 1000, 0.0, 0.0, 0.0)

    def loss(train: bool = False):
        return forward_loss(cfg, models, engine, inputs, x, rnd, train=train)

    start = float(loss().loss)
    assert start == pytest.approx(0.6931471805599453, abs=1e-6)  # the LoRA starts at zero: policy == reference
    for _ in range(3):
        engine.backward(loss(train=True).loss)
        engine.step()
    assert float(loss().loss) < start


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_unet_lora_run_on_plain_preference_pairs_without_an_adapter(tmp_path, arch) -> None:
    manifest = preference_manifest(tmp_path)
    cfg = _cfg(tmp_path, manifest, f"model.tiny_architecture={arch}")
    result = train(cfg)
    assert result.final_step == 2 and result.adapter_path is None
    assert result.fixed_batch_loss_start == pytest.approx(0.6931471805599453, abs=1e-6)  # LoRA off == on at step 0
    run = tmp_path / "run"
    assert not (run / "ip_adapter.safetensors").exists() and (run / "unet_lora").is_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter"] is None and set(summary["exports"]) == {"unet_lora"}
    with safe_open(str(tmp_path / "cache" / "shard_00000.safetensors"), framework="pt") as f:
        assert "image_features" not in set(f.keys())  # text-only conditioning: no image encoder ran
    # the checkpoint resumes (an empty adapter file, the LoRA file)
    more = _cfg(tmp_path, manifest, f"model.tiny_architecture={arch}", "train.max_steps=3")
    assert train(more, resume="latest").final_step == 3


def test_preference_pairs_need_a_model_without_an_adapter(tmp_path) -> None:
    manifest = preference_manifest(tmp_path)
    cfg = _cfg(tmp_path, manifest, "model.use_ip_adapter=true")
    with pytest.raises(UserError, match=r"4 plain preference pair\(s\) .*model\.use_ip_adapter=false"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"model\.trainable"):
        _cfg(tmp_path, manifest, "model.trainable=ip_adapter+unet_lora")
    with pytest.raises(ConfigError, match=r"samples\.references"):
        _cfg(tmp_path, manifest, f"samples.references={PHOTOS}", "samples.prompts=[a dog]")
    # a real-scale config without an IP-Adapter needs no image encoder
    cfg = load_config(TINY, ["model.tiny=false", "model.pretrained_path=x", "model.use_ip_adapter=false",
                             "model.trainable=unet_lora"], check_paths=False)  # fmt: skip
    assert cfg.model.image_encoder_path is None
