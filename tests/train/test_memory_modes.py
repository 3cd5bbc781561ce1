"""The memory plan for every model.trainable mode, world size and ZeRO stage.

* the estimate (built on ``meta``) against the tensors a real tiny CPU run holds after one optimizer step;
* the ZeRO sharding arithmetic against hand-computed bytes;
* bad input gets one clear line.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from patchdpo_fast.cli import main as cli_main
from patchdpo_fast.config import load_config
from patchdpo_fast.training.build import build_engine, build_models
from patchdpo_fast.training.distributed import setup_distributed
from patchdpo_fast.training.memory import (
    Parallelism,
    TensorCensus,
    estimate_memory,
    log_startup_plan,
    parallelism_from_config,
    plan_from_census,
    startup_plan,
    tensor_bytes,
)
from patchdpo_fast.training.trainable import setup_trainable

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
FP32, BF16 = torch.float32, torch.bfloat16


def _cfg(*overrides: str):
    return load_config(TINY, ["data.resolution=64", "data.pairs_per_batch=1", *overrides], check_paths=False)


def _real_step(cfg):
    """Build the trainer's real tiny models for ``cfg``, run one optimizer step, and measure what is held."""
    env = setup_distributed(False)
    models = build_models(cfg, env)
    trainable = setup_trainable(cfg, models)
    engine = build_engine(cfg, models, env, trainable)
    ip_unet = models.ip_unet
    n, unet_cfg, enc = 2, models.unet.config, models.image_encoder.config
    g = torch.Generator().manual_seed(0)
    pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
    args = (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 77, unet_cfg.cross_attention_dim, generator=g), torch.randn(n, pooled, generator=g),
            models.add_time_ids(n, 64), torch.randn(n, (enc.image_size // enc.patch_size) ** 2 + 1, enc.hidden_size,
                                                    generator=g))  # fmt: skip
    pred = engine.forward(*args)
    engine.backward(pred.float().square().mean())
    trainable_params = [p for p in ip_unet.parameters() if p.requires_grad]
    grads = tensor_bytes(p.grad for p in trainable_params)
    engine.step()
    ref_ids = {id(p) for p in ip_unet.reference_parameters()} if ip_unet.has_reference else set()
    weights = tensor_bytes(t for t in (*ip_unet.parameters(), *ip_unet.buffers()) if id(t) not in ref_ids)
    reference = tensor_bytes(p for p in ip_unet.parameters() if id(p) in ref_ids)
    if trainable.reference is not None:
        reference += tensor_bytes((*trainable.reference.parameters(), *trainable.reference.buffers()))
    state = tensor_bytes(pytree.tree_leaves(dict(engine.optimizer.state)))
    return {"weights": weights, "gradients": grads, "optimizer": state, "reference": reference}, models, trainable


@pytest.mark.parametrize(
    ("mode", "loss", "optimizer"),
    [
        ("ip_adapter", "patch_dpo", "adamw"),
        ("ip_adapter", "patch_dpo", "adamw8bit"),
        ("unet_lora", "patch_dpo", "adamw"),
        ("unet_lora", "diffusion_dpo", "adamw8bit"),
        ("unet", "diffusion_dpo", "adamw"),
        ("unet", "patch_dpo", "adamw8bit"),
        ("ip_adapter+unet", "mse", "adamw"),
    ],
)
def test_estimate_within_10_percent_of_a_real_tiny_run(mode, loss, optimizer):
    cfg = _cfg(f"model.trainable={mode}", f"loss.type={loss}", f"optim.optimizer={optimizer}")
    plan = estimate_memory(cfg, activations=False)
    real, models, trainable = _real_step(cfg)
    est = {"weights": plan.weights_bytes, "gradients": plan.gradients_bytes, "optimizer": plan.optimizer_bytes,
           "reference": plan.reference_bytes}  # fmt: skip
    for key in est:  # every category (weights + optimizer states, the criterion, and the others)
        assert abs(est[key] - real[key]) <= 0.10 * max(real[key], 1), (key, est[key], real[key])
    assert abs(sum(est.values()) - sum(real.values())) <= 0.10 * sum(real.values())
    assert real["optimizer"] > 0 and real["gradients"] > 0
    if mode == "unet_lora":
        assert plan.reference_bytes == 0 and "LoRA switched off" in plan["DPO reference"].detail
    if mode == "unet":  # a frozen full copy in reference_dtype (fp32 here): as large as the policy's weights
        assert plan.reference_bytes == real["reference"] > 0.9 * real["weights"]
    if loss == "mse":
        assert plan.reference_bytes == 0
    # the start-up plan counts the same from the real tensors
    start = startup_plan(cfg, models, 1, trainable.reference, activations=False)
    assert (start.weights_bytes, start.gradients_bytes, start.optimizer_bytes, start.reference_bytes) == (
        plan.weights_bytes, plan.gradients_bytes, plan.optimizer_bytes, plan.reference_bytes)  # fmt: skip


def test_ema_is_one_fp32_copy_of_what_trains():
    plan = estimate_memory(_cfg("model.trainable=unet_lora", "optim.use_ema=true"), activations=False)
    off = estimate_memory(_cfg("model.trainable=unet_lora"), activations=False)
    assert plan.ema_bytes == 4 * plan.settings["trainable_params"] > 0 and off.ema_bytes == 0
    assert plan.total_bytes - off.total_bytes == plan.ema_bytes


# ---------------------------------------------------------------------------------------------------------------
# ZeRO arithmetic against hand-computed numbers
# ---------------------------------------------------------------------------------------------------------------

# Ψ = 1000 trainable fp32 elements; frozen: one 200-element parameter and a 50-element fp32 buffer; a 40-element
# parameter (below the persistence threshold of 100) trains too.
CENSUS = TensorCensus(
    trainable=[(1000, FP32, True), (40, FP32, True)],
    frozen=[(200, FP32, True), (50, FP32, False)],
    trains="test",
)
PSI = 1040
ADAMW_STEP = 4  # torch AdamW keeps one fp32 `step` scalar per parameter tensor


def _plan(**par):
    return plan_from_census(CENSUS, Parallelism(**par), optimizer="adamw")


def test_plain_single_process():
    p = _plan()
    assert p["trainable weights"].bytes == 4 * PSI
    assert p["frozen weights"].bytes == 4 * 200 + 4 * 50
    assert p.gradients_bytes == 4 * PSI
    assert p["master weights"].bytes == 0
    assert p["optimizer state"].bytes == 8 * PSI + 2 * ADAMW_STEP
    assert p.total_bytes == 4 * PSI + 1000 + 4 * PSI + 8 * PSI + 8


def test_ddp_keeps_a_second_gradient_copy():
    p = _plan(world_size=4)
    assert p.gradients_bytes == 2 * 4 * PSI
    assert p.optimizer_bytes == 8 * PSI + 2 * ADAMW_STEP  # nothing divided without ZeRO


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_bf16(stage):
    n = 4
    part = math.ceil(PSI / n)  # 260
    p = _plan(world_size=n, zero_stage=stage, mixed_precision="bf16")
    assert p["trainable weights"].bytes == 2 * PSI  # cast to bf16, whole on every rank
    assert p["frozen weights"].bytes == 2 * 200 + 4 * 50  # parameters cast, the buffer keeps fp32
    low_grads = 2 * PSI if stage == 1 else 2 * part  # ZeRO-2 divides the bf16 gradients
    assert p.gradients_bytes == low_grads + 4 * part  # + the fp32 gradient partition of the update
    assert p["master weights"].bytes == 4 * part
    assert p["optimizer state"].bytes == 8 * part + ADAMW_STEP  # one flat fp32 partition
    assert p.host_bytes == 0


def test_zero_3_bf16_partitions_weights_and_keeps_small_ones_whole():
    n = 4
    part = math.ceil(PSI / n)
    p = _plan(world_size=n, zero_stage=3, mixed_precision="bf16", persistence_threshold=100)
    # 1000 elements: a quarter each; 40 elements (<= threshold): whole after the first gather, plus its partition
    assert p["trainable weights"].bytes == 2 * 250 + 2 * (40 + 10)
    assert p["frozen weights"].bytes == 2 * 50 + 4 * 50  # the 200-element parameter partitioned; buffers whole
    assert p.gradients_bytes == 2 * part + 4 * part
    assert p["master weights"].bytes == 4 * part and p["optimizer state"].bytes == 8 * part + ADAMW_STEP


def test_zero_3_full_finetune_reference_is_partitioned_like_the_policy():
    par3 = Parallelism(world_size=8, zero_stage=3, mixed_precision="bf16", persistence_threshold=0)
    bf16 = TensorCensus(trainable=[(1000, FP32, True)], frozen=[], reference_model=[(1000, torch.bfloat16, True)])
    assert plan_from_census(bf16, par3).reference_bytes == 2 * 125  # reference_dtype auto = bf16, 1/8 per rank
    census = TensorCensus(trainable=[(1000, FP32, True)], frozen=[], reference_model=[(1000, FP32, True)])
    assert plan_from_census(census, par3).reference_bytes == 4 * 125  # reference_dtype fp32 is kept by the engine
    p2 = plan_from_census(census, Parallelism(world_size=8, zero_stage=2, mixed_precision="bf16"))
    assert p2.reference_bytes == 4 * 1000  # below stage 3: the plain frozen module, as built, on every rank


def test_offload_moves_optimizer_and_parameters_to_the_host():
    n, part = 4, math.ceil(PSI / 4)
    p = _plan(world_size=n, zero_stage=2, mixed_precision="bf16", offload_optimizer=True)
    assert p.optimizer_bytes == 0
    assert p["master weights"].host_bytes == 4 * part and p["optimizer state"].host_bytes == 8 * part + ADAMW_STEP
    assert p.gradients_bytes == 0 and p["gradients"].host_bytes == 4 * part  # reduced into a CPU fp32 partition
    q = _plan(world_size=n, zero_stage=3, mixed_precision="bf16", offload_param=True, persistence_threshold=0)
    assert q["trainable weights"].bytes == 0 and q["trainable weights"].host_bytes == 2 * 250 + 2 * 10
    assert q.weights_bytes == 4 * 50  # only the frozen buffer stays on the GPU


def test_eight_bit_adamw_under_zero_sees_one_flat_partition():
    census = TensorCensus(trainable=[(60_000, FP32, True), (40_000, FP32, True)], frozen=[])
    p = plan_from_census(census, Parallelism(world_size=4, zero_stage=2), optimizer="adamw8bit")
    part = 25_000  # >= 4096: bitsandbytes quantizes it (smaller tensors keep 32-bit states)
    # two 8-bit moments, a float32 scale per 256-element block each, and the two 256-entry quantization maps
    assert p["optimizer state"].bytes == 2 * part + 2 * 4 * math.ceil(part / 256) + 2 * 256 * 4
    small = plan_from_census(CENSUS, Parallelism(world_size=4, zero_stage=2), optimizer="adamw8bit")
    assert small["optimizer state"].bytes == 8 * math.ceil(PSI / 4)  # a 260-element partition: 32-bit states


def test_config_stage_and_offload_come_from_the_deepspeed_json_and_flags_override():
    cfg = _cfg("deepspeed.config=configs/deepspeed/zero3_offload.json", "train.mixed_precision=bf16")
    par = parallelism_from_config(cfg, 8)
    got = (par.zero_stage, par.offload_optimizer, par.offload_param, par.persistence_threshold)
    assert got == (3, True, False, 1_000_000)
    assert par.deepspeed_optimizer and par.mixed_precision == "bf16"
    par = parallelism_from_config(cfg, 8, zero_stage=2, offload="none")
    assert (par.zero_stage, par.offload_optimizer, par.offload_param) == (2, False, False)
    assert parallelism_from_config(_cfg(), 2) == Parallelism(world_size=2)  # no DeepSpeed configured


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 0}, "world_size must be a positive integer"),
        ({"world_size": 2, "zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
        ({"zero_stage": 3, "offload": "gpu"}, "offload must be one of none, optimizer, param, optimizer+param"),
        ({"offload": "optimizer"}, "offload needs DeepSpeed ZeRO"),
        ({"zero_stage": 2, "offload": "param"}, "parameter offload needs ZeRO stage 3"),
    ],
)
def test_bad_input_is_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        estimate_memory(_cfg(), activations=False, **kwargs)
    assert "\\n" not in str(info.value)


def test_refused_combinations_say_why():
    with pytest.raises(ValueError, match="use_ema"):
        estimate_memory(_cfg("optim.use_ema=true"), zero_stage=3, activations=False)
    with pytest.raises(ValueError, match="adamw8bit"):
        estimate_memory(_cfg("optim.optimizer=adamw8bit"), zero_stage=2, offload="optimizer", activations=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--world-size", "0"], "world-size must be a positive integer"),
        (["--zero-stage", "3", "--offload", "disk"], "offload must be one of"),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv, message, capsys):
    assert cli_main(["estimate-memory", "--config", str(TINY), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("patchdpo estimate-memory:") and message in err[0], err


def test_cli_prints_the_plan(capsys):
    assert cli_main(["estimate-memory", "--config", str(TINY), "--set", "model.trainable=unet",
                     "--world-size", "2", "--zero-stage", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "2 GPUs, ZeRO-2" in out and "| master weights |" in out and "| **total** |" in out


def test_startup_plan_is_logged(caplog):
    cfg = _cfg("model.trainable=unet_lora")
    env = setup_distributed(False)
    models = build_models(cfg, env)
    trainable = setup_trainable(cfg, models)
    with caplog.at_level(logging.INFO, logger="patchdpo_fast.train"):
        log_startup_plan(cfg, models, 1, trainable.reference)
    text = caplog.text
    assert "memory plan per GPU (unet_lora" in text and "activations (1 pairs)" in text and "total" in text


def test_zero3_reference_is_counted_in_reference_dtype():
    """Under ZeRO-3 the frozen reference engine keeps model.reference_dtype (not the policy's bf16)."""
    opts = ("model.trainable=unet", "loss.type=patch_dpo", "train.mixed_precision=bf16")
    auto = estimate_memory(_cfg(*opts), world_size=2, zero_stage=3, activations=False)
    fp32 = estimate_memory(_cfg(*opts, "model.reference_dtype=fp32"), world_size=2, zero_stage=3, activations=False)
    assert auto.reference_bytes > 0
    assert fp32.reference_bytes == pytest.approx(2 * auto.reference_bytes, rel=0.02)  # buffers keep their dtype
    assert fp32.weights_bytes == auto.weights_bytes  # the policy is bf16 either way
