"""The quick-start kit: the mini world's pre-trained model and a small pair set, shipped with the package.

``configs/mini_world.yaml`` (the README's first command) finetunes the shipped model with PatchDPO on the shipped
pairs and writes sample grids of held-out subjects before and after. The kit is written from a finished
``patchdpo minibench`` run by::

    python -m patchdpo_fast.minibench.quickstart --run runs/minibench --out patchdpo_fast/minibench/assets/quickstart

* ``model/base`` (UNet in fp16, the frozen text encoders, tokenizers, scheduler, pixel-space autoencoder),
  ``model/image_encoder`` and ``model/ip_adapter.safetensors`` (fp16): the run's pre-trained IP-Adapter-Plus;
* ``pairs/``: the pairs of the first ``--subjects`` training subjects (first generated image of each prompt) with
  their quality maps, as a manifest: the oracle's (``--maps oracle``, the default: the maps a perfect estimator
  would give; the benchmark shows the estimators' maps carry little information in this world) or the
  estimator's (``--maps estimator``);
* ``heldout_references/``: the references of held-out subjects, for the sample grids.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "write_quickstart"]


def _fp16_copy(src: Path, dst: Path) -> None:
    """Copy a model folder, rewriting its safetensors weights in fp16."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for file in src.glob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(file)).items()}
        save_file(tensors, str(dst / file.name), metadata={"format": "pt"})


def write_quickstart(
    run: str | Path, out: str | Path, subjects: int = 16, heldout: int = 8, maps: str = "oracle"
) -> dict[str, Any]:
    """Write the kit from a finished minibench run folder ``run`` into ``out`` (replaced); ``maps`` is ``oracle`` or
    ``estimator``."""
    from patchdpo_fast.data.manifest import Manifest
    from patchdpo_fast.models.ip_adapter import read_ip_adapter_file, write_ip_adapter_file

    run, out = Path(run), Path(out)
    if maps not in ("oracle", "estimator"):
        raise ValueError(f"maps must be 'oracle' or 'estimator', got {maps!r}")
    if not (run / "stages" / "quality.json").is_file():
        raise FileNotFoundError(f"{run} is not a minibench run whose quality stage has finished")
    if out.exists():
        shutil.rmtree(out)
    model = out / "model"
    model.mkdir(parents=True)
    base = run / "model_pretrained" / "base"
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        _fp16_copy(sub, model / "base" / sub.name)
    _fp16_copy(run / "model_init" / "image_encoder", model / "image_encoder")
    groups = read_ip_adapter_file(run / "pretrain" / "ip_adapter.safetensors")
    write_ip_adapter_file(model / "ip_adapter.safetensors", groups["image_proj"], groups["ip_adapter"], torch.float16)

    source = Manifest.load(run / "pairs" / f"manifest.{maps}.jsonl", check="quick")
    keep = sorted({r.subject for r in source})[:subjects]
    pairs = out / "pairs"
    records = []
    for rec in source:
        if rec.subject not in keep:
            continue
        gen = rec.generated[0]
        copies = {}
        for key, rel in (("image", gen.image), ("q_ref", gen.q_ref), ("q_gen", gen.q_gen)):
            target = pairs / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.resolve(rel), target)
            copies[key] = rel
        ref_rel = f"references/{rec.subject}/{source.resolve(rec.reference).name}"
        (pairs / ref_rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.resolve(rec.reference), pairs / ref_rel)
        rec.reference = ref_rel
        gen.image, gen.q_ref, gen.q_gen = copies["image"], copies["q_ref"], copies["q_gen"]
        rec.generated = [gen]
        records.append(rec)
    header = {k: v for k, v in source.header.items() if k not in ("format", "version")}
    header["source"] = (
        f"patchdpo minibench run {run.name}: first {subjects} training subjects, first image each, {maps} maps"
    )
    Manifest(pairs / "manifest.jsonl", records, header).save()

    settings = json.loads((run / "settings.json").read_text(encoding="utf-8"))
    world = json.loads((run / "world" / "world.json").read_text(encoding="utf-8"))
    names = [s["name"] for s in world["subjects"][len(world["subjects"]) - settings["world"]["num_heldout"] :]]
    for name in names[:heldout]:
        src = run / "world" / "references" / name / "reference.png"
        (out / "heldout_references" / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / "heldout_references" / name / "reference.png")
    info = {"run": str(run), "maps": maps, "pairs": len(records), "subjects": keep, "heldout": names[:heldout]}
    (out / "quickstart.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    """``python -m patchdpo_fast.minibench.quickstart --run RUN --out DIR``."""
    p = argparse.ArgumentParser(description="Write the quick-start kit from a finished minibench run.")
    p.add_argument("--run", type=Path, required=True, help="a minibench run folder (stages up to quality done)")
    p.add_argument("--out", type=Path, required=True, help="the kit folder (replaced)")
    p.add_argument("--subjects", type=int, default=16, help="training subjects whose pairs are kept (default 16)")
    p.add_argument("--heldout", type=int, default=8, help="held-out references for the sample grids (default 8)")
    p.add_argument(
        "--maps", choices=("oracle", "estimator"), default="oracle", help="whose quality maps (default oracle)"
    )
    args = p.parse_args(argv)
    try:
        info = write_quickstart(args.run, args.out, args.subjects, args.heldout, args.maps)
    except (FileNotFoundError, ValueError) as exc:
        print(f"quickstart: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
