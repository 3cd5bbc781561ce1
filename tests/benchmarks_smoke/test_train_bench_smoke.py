"""Smoke tests of the training-step benchmark (``benchmarks/test_bench_train.py``) and of the SDXL configs it uses.

* The SDXL-shaped stack built on the meta device has the sizes DESIGN.md section 4 states (2.567 B UNet parameters,
  70 IP K/V pairs) and the forward FLOPs the benchmark's MFU relies on.
* The tiny-scale benchmark runs every recipe on the CPU for one warm-up and one timed step and records the fields
  the report needs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import train_recipes as tr  # noqa: E402
import train_report  # noqa: E402

from patchdpo_fast.models.ip_adapter import cross_attention_processor_names  # noqa: E402
from patchdpo_fast.models.sdxl_config import (  # noqa: E402
    SDXL_NUM_IP_LAYERS,
    SDXL_UNET_PARAMETERS,
    assemble_models,
    build_sdxl_components,
)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl_meta() -> dict:
    return build_sdxl_components("meta", torch.float32)


def test_sdxl_config_sizes_on_meta(sdxl_meta) -> None:
    unet = sdxl_meta["unet"]
    assert all(p.device.type == "meta" for p in unet.parameters())
    n = _params(unet)
    assert abs(n - 2.567e9) <= 0.01 * 2.567e9, n
    assert n == SDXL_UNET_PARAMETERS  # exact for the diffusers releases we pin against
    assert len(cross_attention_processor_names(unet)) == SDXL_NUM_IP_LAYERS == 70
    expected = {"vae": 83.65e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6, "image_encoder": 632.08e6}
    for key, count in expected.items():
        assert abs(_params(sdxl_meta[key]) - count) <= 0.01 * count, key
    assert sdxl_meta["unet"].config.cross_attention_dim == 2048
    assert sdxl_meta["text_encoder"].config.hidden_size + sdxl_meta["text_encoder_2"].config.hidden_size == 2048


def test_sdxl_adapter_on_meta(sdxl_meta) -> None:
    models = assemble_models(dict(sdxl_meta), weight_dtype=torch.float32)
    procs = models.ip_unet.ip_processors
    assert len(procs) == 70
    trainable = models.trainable_parameters()
    assert len(trainable) == 2 * 70  # to_k_ip and to_v_ip per cross-attention layer
    assert sum(p.numel() for p in trainable) == 340_787_200
    assert models.num_ip_tokens == 16 and models.image_size == 224 and models.vae_scale_factor == 8


def test_sdxl_forward_flops_match_design(sdxl_meta) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = sdxl_meta["unet"], sdxl_meta["vae"]
    with torch.device("meta"), torch.no_grad():
        args = (torch.randn(1, 4, 64, 64), torch.tensor([500]))
        kwargs = {
            "encoder_hidden_states": torch.randn(1, 77 + 16, 2048),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)},
        }
        with FlopCounterMode(display=False) as fc:
            unet(*args, **kwargs)
        with FlopCounterMode(display=False) as fv:
            vae.encode(torch.randn(1, 3, 512, 512))
    assert abs(fc.get_total_flops() - tr.DESIGN_FWD_FLOPS_512) <= 0.01 * tr.DESIGN_FWD_FLOPS_512
    assert abs(fv.get_total_flops() - train_report.VAE_ENCODER_FLOPS_512) <= 0.01 * train_report.VAE_ENCODER_FLOPS_512


def test_tiny_train_bench_records(tmp_path) -> None:
    out = tmp_path / "train.json"
    # The PyTorch loss: tests/conftest.py selects Triton's interpreter, far too slow for a timing smoke test.
    result = tr.run_benchmark(torch.device("cpu"), scale="tiny", quick=True, warmup=1, steps=1, out_json=out,
                              loss_backend="torch", log=lambda _msg: None)  # fmt: skip
    assert json.loads(out.read_text())["recipes"] == json.loads(json.dumps(result["recipes"], default=str))
    by_name = {r["name"]: r for r in result["recipes"]}
    assert list(by_name) == list(tr.RECIPE_NAMES)
    assert by_name["official+fp16w"]["status"] == "skipped"  # SDXL scale only
    assert not tr.failed(result)
    ran = [r for r in result["recipes"] if r["status"] == "ok"]
    assert {r["name"] for r in ran} >= {"official", "ours", "ours+ckpt"}
    for r in ran:
        assert r["timed_steps"] == 1 and r["warmup_steps"] == 1
        if r["kind"] == "ours":
            assert r["loss_backend"] == "torch"
        assert r["step_s"] > 0 and math.isclose(r["samples_per_s"], 2 * r["pairs_per_s"])
        assert math.isclose(r["pairs_per_s"], 4 / r["step_s"])
        assert 0 < r["mfu"] < 1
        assert r["finite"] and r["peak_allocated_bytes"] is None and "CUDA" in r["memory_reason"]
        assert r["input_cache"] == (r["kind"] == "ours")
    assert result["plan"] == {"scale": "tiny", "warmup": 1, "steps": 1, "pairs": 4, "images_per_step": 8,
                              "budget_s": None, "resolution": 64}  # fmt: skip
    assert result["flops"]["fwd_bwd_per_image"] > result["flops"]["fwd_per_image"] > 0
    assert result["matmul"]["flops_per_s"] > 0
    rows = result["comparison"]["rows"]
    assert {row["recipe"] for row in rows} == {r["name"] for r in ran if r["kind"] == "ours"}
    assert all(row["baseline"] == "official" and row["speedup"] > 0 for row in rows)
    assert result["comparison"]["verdict"]["status"] == "not evaluated"
    md = train_report.render(result)
    for text in ("training-step benchmark", "| official |", "| ours+ckpt |", "Not evaluated", "tiny CPU scale"):
        assert text in md
