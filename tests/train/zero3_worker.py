"""Test worker launched on 2 CPU ranks by tests/train/test_zero3_unet.py: ZeRO-3 internals of the UNet modes.

For ``model.trainable`` unet_lora and unet, built with the trainer's own pieces under a ZeRO-3 config whose
parameters are all released after use, it records per rank (``<out>/rank<N>.json``): the step-0 DPO log-ratio and
loss, how the policy's and the frozen reference's parameters are partitioned, whether the reference forward after
training still reproduces the initial model's prediction bit for bit, whether the gathered frozen reference
changed, and the dtypes of policy and reference (also for bf16 training with an fp32 reference).
Usage: ``deepspeed --num_gpus 2 zero3_worker.py <deepspeed.json> <out_dir>``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.config import load_config
from patchdpo_fast.data import build_pair_dataset
from patchdpo_fast.training.batch import draw_pair_noise
from patchdpo_fast.training.build import build_engine, build_models
from patchdpo_fast.training.distributed import setup_distributed
from patchdpo_fast.training.inputs import ModelInputs, collate
from patchdpo_fast.training.step import forward_loss
from patchdpo_fast.training.trainable import setup_trainable

REPO = Path(__file__).resolve().parents[2]


def _partitioning(module: torch.nn.Module, world_size: int) -> dict[str, Any]:
    """How ``module``'s parameters are held on this rank: ZeRO-3 shares and what stays materialized."""
    params = list(module.parameters())
    return {
        "params": len(params),
        "zero3": sum(hasattr(p, "ds_tensor") for p in params),
        "total": sum(int(p.ds_numel) for p in params if hasattr(p, "ds_numel")),
        "local": sum(int(p.ds_tensor.numel()) for p in params if hasattr(p, "ds_tensor")),
        "share_ok": all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world_size) for p in params),
        "materialized": sum(int(p.data.numel()) for p in params),
    }


def _gathered_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().clone() for name, p in params.items()}


def run_mode(mode: str, ds_json: str, env: Any, *extra: str) -> dict[str, Any]:
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*extra,
        f"deepspeed.config={ds_json}", f"model.trainable={mode}", "model.lora.rank=4", "cache.enabled=false",
        "data.procedural.num_pairs=2", "data.pairs_per_batch=1", "optim.warmup_steps=0", "data.drop_image=0",
        "data.drop_text=0", "data.drop_both=0", "loss.type=patch_dpo", "loss.beta=1000", "optim.lr=1e-3",
    ], check_paths=False)  # fmt: skip
    torch.manual_seed(0)
    models = build_models(cfg, env)
    setup = setup_trainable(cfg, models)
    engine = build_engine(cfg, models, env, setup)
    inputs = ModelInputs(cfg, models, env, None)
    dataset = build_pair_dataset(cfg.data, needs_quality=True)
    index = env.rank  # each rank its own pair: micro-batch 1
    x = inputs(collate([dataset[index]]), 0)
    rnd = draw_pair_noise(0, 0, [index], tuple(x["lat_ref"].shape[1:]), 1000, 0.0, 0.0, 0.0)

    sched = models.noise_scheduler
    lat = torch.cat([x["lat_ref"], x["lat_gen"]])
    noise, t = rnd.noise.repeat(2, 1, 1, 1), rnd.timesteps.repeat(2)
    args = (sched.add_noise(lat, noise, t), t, x["embeds"].repeat(2, 1, 1), x["pooled"].repeat(2, 1),
            models.add_time_ids(2, cfg.data.resolution), x["feats"].repeat(2, 1, 1))  # fmt: skip

    def policy() -> torch.Tensor:
        with torch.no_grad():
            return engine.module(*args, use_reference=False)

    out0 = forward_loss(cfg, models, engine, inputs, x, rnd, train=False)
    pred0, ref0 = policy(), engine.reference_forward(*args)
    reference = engine.reference.module if engine.reference is not None else None
    ref_before = _gathered_copy(reference) if reference is not None else None
    losses = []
    for _ in range(3):
        out = forward_loss(cfg, models, engine, inputs, x, rnd, train=True)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
    pred3, ref3 = policy(), engine.reference_forward(*args)
    lora_modules = torch.nn.ModuleList(
        [m for n, m in models.ip_unet.unet.named_modules() if n.endswith(("lora_A", "lora_B"))]
    )
    result: dict[str, Any] = {
        "log_ratio0": [float(v) for v in out0.log_ratio.flatten()],
        "loss0": float(out0.loss),
        "log2_fp32": float(torch.tensor(math.log(2.0), dtype=torch.float32)),
        "step0_policy_eq_reference": bool(torch.equal(pred0, ref0)),
        "reference_after_eq_initial": bool(torch.equal(ref3, pred0)),
        "reference_after_eq_before": bool(torch.equal(ref3, ref0)),
        "policy_moved": float((pred3 - pred0).abs().max()),
        "losses": losses,
        "policy": _partitioning(models.ip_unet, env.world_size),
        "lora": _partitioning(lora_modules, env.world_size),
        "reference_kind": type(engine.reference).__name__ if engine.reference is not None else None,
        "policy_dtype": str(models.ip_unet.unet.conv_in.weight.dtype),
        "reference_dtype": str(reference.unet.conv_in.weight.dtype) if reference is not None else None,
    }
    if reference is not None:
        result["reference"] = _partitioning(reference, env.world_size)
        ref_after = _gathered_copy(reference)
        result["reference_unchanged"] = all(torch.equal(ref_before[k], ref_after[k]) for k in ref_before)
        result["reference_gathered_numel"] = sum(v.numel() for v in ref_after.values())
    return result


def main() -> None:
    ds_json, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
    out_dir = Path(out)
    torch.set_num_threads(1)
    env = setup_distributed(True)
    try:
        results = {mode: run_mode(mode, ds_json, env) for mode in ("unet_lora", "unet")}
        # bf16 training with an fp32 reference (model.reference_dtype): the reference engine must stay fp32
        results["unet_bf16"] = run_mode(
            "unet", ds_json, env, "train.mixed_precision=bf16", "model.reference_dtype=fp32"
        )
        (out_dir / f"rank{env.rank}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    finally:
        env.shutdown()


if __name__ == "__main__":
    main()
