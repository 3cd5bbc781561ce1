"""``patchdpo minibench``: the paper's comparison, reproduced in a miniature world learnt from scratch on the CPU.

Stages (each resumable; a finished stage leaves ``stages/<name>.json`` in the run folder and is skipped on rerun):

1. ``world`` — render the world (:mod:`~patchdpo_fast.minibench.world`): every subject's reference, ground-truth
   scenes of the training subjects as a pretraining manifest (reference + prompt -> the subject in the scene), and
   the prompt list for pair building.
2. ``judges`` — train the graders on clean renders (:mod:`~patchdpo_fast.minibench.judges`) and check them.
3. ``init`` — write the randomly initialized mini IP-Adapter-Plus (:mod:`~patchdpo_fast.minibench.architecture`).
4. ``pretrain`` — ``patchdpo train`` with ``loss.type=reconstruction``, UNet + resampler + IP K/V trainable: the
   "pre-trained IP-Adapter-Plus" of the mini world. Its UNet export and adapter become the base model.
5. ``pairs`` — ``patchdpo build-pairs`` with the base model on the training subjects only.
6. ``quality`` — ``patchdpo quality`` with the estimator, and oracle maps from the renderer's ground truth
   (:mod:`~patchdpo_fast.minibench.oracle`); plus the flipped-map control.
7. ``finetune`` — ``patchdpo train`` from the same base, same steps, same seeds, one run per objective x seed
   (only the IP K/V projections train, as in the paper), plus the semantic-bug controls.
8. ``evaluate`` — every model generates the held-out subjects in the evaluation scenes (same noise per seed for
   every model) and is graded (:mod:`~patchdpo_fast.minibench.metrics`).
9. ``report`` — table (mean +- std over seeds, laid out like the paper's DreamBench table), sanity checks, the
   sample grid and the bar chart (:mod:`~patchdpo_fast.minibench.report`).

The library's commands run in-process through their own ``main`` functions, with the configs they read written
into ``configs/`` of the run folder, so every stage can also be rerun by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdpo_fast.minibench.architecture import SIZES
from patchdpo_fast.minibench.settings import MinibenchSettings, Variant, preset
from patchdpo_fast.minibench.world import MiniWorld
from patchdpo_fast.utils import atomic_write_json, atomic_write_text

__all__ = ["STAGES", "Minibench", "main"]

logger = logging.getLogger("patchdpo_fast.minibench")

STAGES: tuple[str, ...] = ("world", "judges", "init", "pretrain", "pairs", "quality", "finetune", "evaluate", "report")
#: The settings each stage's results depend on (directly or through earlier stages' outputs).
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "world": ("world.",),
    "judges": ("world.", "judges."),
    "init": ("world.resolution", "size"),
    "pretrain": ("world.", "size", "pretrain.", "quality.map_size"),
    "pairs": ("pairs.",),
    "quality": ("quality.",),
    "finetune": ("finetune.",),
    "evaluate": ("eval.", "finetune."),
    "report": (),
}


class CommandError(RuntimeError):
    """A library command called by a stage returned a non-zero status."""


def _run_command(name: str, main_fn: Callable[[list[str]], int], argv: list[str]) -> None:
    logger.info("$ patchdpo %s %s", name, " ".join(argv))
    status = main_fn(argv)
    if status:
        raise CommandError(f"patchdpo {name} exited with status {status}")


class Minibench:
    """A run folder and its stages (see the module docstring).

    Args:
        folder: the run folder (created).
        settings: what to run; must equal the folder's recorded settings unless ``overwrite``.
        overwrite: delete an existing run folder first.
        progress: progress bars.
    """

    def __init__(
        self, folder: str | Path, settings: MinibenchSettings, *, overwrite: bool = False, progress: bool = True
    ) -> None:
        self.folder = Path(folder).resolve()
        self.settings = settings
        self.progress = progress
        record = self.folder / "settings.json"
        if overwrite and self.folder.exists():
            logger.info("--overwrite: removing %s", self.folder)
            shutil.rmtree(self.folder)
        if record.is_file():
            self._check_settings(json.loads(record.read_text(encoding="utf-8")))
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, settings.to_dict())
        w = settings.world
        self.world = MiniWorld(w.num_subjects, w.num_heldout, w.resolution, w.seed)

    def _check_settings(self, recorded: dict[str, Any]) -> None:
        """Refuse settings that differ where a finished stage depends on them; accept (and log) the others."""
        current = json.loads(json.dumps(self.settings.to_dict()))
        # a setting added since the run was recorded has its default there (the default keeps the old behaviour);
        # an unreadable record is compared as it is, every difference named
        with contextlib.suppress(TypeError, ValueError):
            recorded = json.loads(json.dumps(MinibenchSettings.from_dict(recorded).to_dict()))
        problems, changes = [], []
        for line in _diff(recorded, current):
            key = line.split(":", 1)[0]
            stages = [st for st, keys in STAGE_SETTINGS.items() if any(key.startswith(k) for k in keys)]
            done = [st for st in stages if self.done(st)]
            (problems if done else changes).append(f"{line} (stage {', '.join(done or stages)})")
        if problems:
            raise ValueError(
                f"{self.folder} holds a minibench run whose finished stages used other settings: "
                f"{'; '.join(problems[:6])}; use another folder or --overwrite"
            )
        for line in changes:
            logger.info("settings changed for stages not run yet: %s", line)

    # ------------------------------------------------------------------------------------------------ paths
    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    def done(self, stage: str) -> bool:
        return self.path("stages", f"{stage}.json").is_file()

    def _finish(self, stage: str, info: dict[str, Any]) -> None:
        atomic_write_json(self.path("stages", f"{stage}.json"), info)

    # ------------------------------------------------------------------------------------------------ driver
    def run(self, until: str | None = None) -> dict[str, Any]:
        """Run every stage not yet done (up to and including ``until``); returns the per-stage info."""
        torch.set_num_threads(self.settings.threads)
        infos: dict[str, Any] = {}
        for i, stage in enumerate(STAGES):
            marker = self.path("stages", f"{stage}.json")
            if marker.is_file():
                logger.info("[%d/%d] %s: done earlier", i + 1, len(STAGES), stage)
                infos[stage] = json.loads(marker.read_text(encoding="utf-8"))
            else:
                logger.info("[%d/%d] %s ...", i + 1, len(STAGES), stage)
                t0 = time.perf_counter()
                info = getattr(self, f"stage_{stage}")() or {}
                info["seconds"] = round(time.perf_counter() - t0, 2)
                self._finish(stage, info)
                infos[stage] = info
                logger.info("[%d/%d] %s finished in %.1f s", i + 1, len(STAGES), stage, info["seconds"])
            if stage == until:
                break
        return infos

    # ------------------------------------------------------------------------------------------------ 1. world
    def stage_world(self) -> dict[str, Any]:
        """References, the pretraining manifest (ground truth) and the pair prompts."""
        from patchdpo_fast.data.files import save_image_atomic
        from patchdpo_fast.data.manifest import GeneratedImage, Manifest, ManifestRecord

        world, w = self.world, self.settings.world
        pretrain_subjects, pair_subjects = self.subject_split()
        atomic_write_json(self.path("world", "world.json"), world.settings())
        for subject in world.subjects:
            image = world.render_reference(subject).image
            save_image_atomic(_to_uint8(image), self.path("world", "references", subject.name, "reference.png"))
            if subject in pair_subjects:
                save_image_atomic(_to_uint8(image), self.path("world", "train_references", subject.name, "ref.png"))
        records = []
        pre = self.path("world", "pretrain")
        for si, subject in enumerate(world.train_subjects):
            if subject not in pretrain_subjects:
                continue
            for ci, scene in enumerate(world.scenes):
                for d in range(w.pretrain_draws):
                    rel = f"images/{subject.name}/{ci:02d}_{d}.png"
                    render = world.render(subject, scene, seed=1_000_000 + (si * 100 + ci) * 10 + d)
                    save_image_atomic(_to_uint8(render.image), pre / rel)
                    records.append(
                        ManifestRecord(
                            id=f"{subject.name}/{ci:02d}_{d}",
                            subject=subject.name,
                            prompt=scene.prompt,
                            reference=f"../references/{subject.name}/reference.png",
                            generated=[GeneratedImage(rel)],
                        )
                    )
        Manifest(pre / "manifest.jsonl", records, {"created_by": "patchdpo minibench (ground truth)"}).save()
        scenes = world.pair_scenes(self.settings.pairs.prompts_per_subject)
        atomic_write_text(self.path("world", "pair_prompts.txt"), "".join(s.prompt + "\n" for s in scenes))
        return {
            "pretrain_records": len(records),
            "pair_prompts": [s.prompt for s in scenes],
            "train_subjects": len(world.train_subjects),
            "pretrain_subjects": len(pretrain_subjects),
            "pair_subjects": len(pair_subjects),
            "heldout_subjects": len(world.heldout_subjects),
        }

    def subject_split(self) -> tuple[list[Any], list[Any]]:
        """``(pretraining subjects, pair subjects)`` among the training subjects (``world.pair_only_subjects``)."""
        train, n = self.world.train_subjects, self.settings.world.pair_only_subjects
        if not 0 <= n < len(train):
            raise ValueError(f"world.pair_only_subjects must be in [0, {len(train) - 1}], got {n}")
        return (list(train), list(train)) if n == 0 else (list(train[:-n]), list(train[-n:]))

    # ------------------------------------------------------------------------------------------------ 2. judges
    def stage_judges(self) -> dict[str, Any]:
        """Train the graders on clean renders and check them on fresh ones."""
        from patchdpo_fast.minibench.judges import save_judges, train_judges

        j = self.settings.judges
        judges = train_judges(
            self.world, steps=j.steps, batch=j.batch, draws=j.draws, seed=j.seed, progress=self.progress
        )
        save_judges(judges, self.path("judges"), self.world)
        logger.info("judges on fresh clean renders of held-out subjects: %s", _fmt(judges.info["sanity"]))
        return {"sanity": judges.info["sanity"]}

    # ------------------------------------------------------------------------------------------------ 3. init
    def stage_init(self) -> dict[str, Any]:
        """The randomly initialized model."""
        from patchdpo_fast.minibench.architecture import write_initial_model

        paths = write_initial_model(self.path("model_init"), self.settings.architecture, self.world.resolution)
        return {k: str(v) for k, v in paths.items()}

    # ------------------------------------------------------------------------------------------------ 4. pretrain
    def pretrain_config(self) -> dict[str, Any]:
        p, res = self.settings.pretrain, self.world.resolution
        return {
            "model": {
                "tiny": False,
                "pretrained_path": str(self.path("model_init", "base")),
                "image_encoder_path": str(self.path("model_init", "image_encoder")),
                "ip_adapter_path": str(self.path("model_init", "ip_adapter_init.safetensors")),
                "num_ip_tokens": self.settings.architecture.num_ip_tokens,
                "train_resampler": True,
                "train_unet": True,
            },
            "data": {
                "source": "manifest",
                "manifest_path": str(self.path("world", "pretrain", "manifest.jsonl")),
                "resolution": res,
                "patch_size": res // self.settings.quality.map_size,
                "pairs_per_batch": p.pairs_per_batch,
                "missing_maps": "uniform",
            },
            "loss": {"type": "reconstruction"},
            "optim": {"lr": p.lr, "warmup_steps": p.warmup_steps, "lr_schedule": p.lr_schedule, "weight_decay": 0.01},
            "train": {
                "max_steps": p.steps,
                "seed": 0,
                "export_dtype": "fp32",  # the base model of every finetune: kept as trained
                "unet_export_dtype": "fp32",  # the pretrained UNet folder too
                "log_every": max(1, min(50, p.steps // 10)),
                "checkpoint_every": p.checkpoint_every,
                "keep_checkpoints": None if p.curve_every else 2,
                "output_dir": str(self.path("pretrain")),
            },
            "cache": {
                "enabled": True,
                "dir": str(self.path("cache", "pretrain")),
                "shard_size": 1024,
                "encode_batch_size": 128,
                "on_stale": "rebuild",
            },
        }

    def _train(self, name: str, config: dict[str, Any]) -> None:
        import yaml

        from patchdpo_fast import train as train_module

        cfg_path = self.path("configs", f"{name}.yaml")
        atomic_write_text(cfg_path, yaml.safe_dump(config, sort_keys=False))
        out = Path(config["train"]["output_dir"])
        argv = ["--config", str(cfg_path)]
        if any((out / "checkpoints").glob("step_*")):
            argv.append("--resume")
        _run_command("train", train_module.main, argv)

    def stage_pretrain(self) -> dict[str, Any]:
        """Pretrain from scratch with plain reconstruction; assemble the base model folder."""
        self._train("pretrain", self.pretrain_config())
        base = self.path("model_pretrained", "base")
        if base.exists():
            shutil.rmtree(base)
        shutil.copytree(self.path("model_init", "base"), base, ignore=shutil.ignore_patterns("unet"))
        shutil.copytree(self.path("pretrain", "unet"), base / "unet")
        summary = json.loads(self.path("pretrain", "summary.json").read_text(encoding="utf-8"))
        return {"base": str(base), "adapter": str(self.path("pretrain", "ip_adapter.safetensors")), **summary}

    @property
    def base_model(self) -> dict[str, Path]:
        return {
            "pretrained": self.path("model_pretrained", "base"),
            "image_encoder": self.path("model_init", "image_encoder"),
            "ip_adapter": self.path("pretrain", "ip_adapter.safetensors"),
        }

    # ------------------------------------------------------------------------------------------------ 5. pairs
    def stage_pairs(self) -> dict[str, Any]:
        """build-pairs with the base model on the training subjects."""
        from patchdpo_fast.data import build_pairs as bp

        p, m = self.settings.pairs, self.base_model
        argv = [
            "--references",
            str(self.path("world", "train_references")),
            "--prompts",
            str(self.path("world", "pair_prompts.txt")),
            "--out",
            str(self.path("pairs")),
            "--num-images",
            str(p.images_per_prompt),
            "--resolution",
            str(self.world.resolution),
            "--steps",
            str(p.sampler_steps),
            "--guidance",
            str(p.guidance),
            "--ip-scale",
            "1.0",
            "--negative-prompt",
            "",
            "--batch-size",
            str(p.batch_size),
            "--pretrained",
            str(m["pretrained"]),
            "--image-encoder",
            str(m["image_encoder"]),
            "--ip-adapter",
            str(m["ip_adapter"]),
            "--scheduler",
            "ddim",
            "--device",
            "cpu",
        ]
        if not self.progress:
            argv.append("--no-progress")
        _run_command("build-pairs", bp.main, argv)
        from patchdpo_fast.data.manifest import Manifest

        manifest = Manifest.load(self.path("pairs", "manifest.jsonl"), check="none")
        return {"records": len(manifest), "pairs": manifest.num_pairs}

    # ------------------------------------------------------------------------------------------------ 6. quality
    def stage_quality(self) -> dict[str, Any]:
        """Estimator maps, oracle maps, the flipped-map control and how well estimator and oracle agree."""
        from patchdpo_fast.data.files import load_image, write_quality_map
        from patchdpo_fast.data.manifest import Manifest
        from patchdpo_fast.minibench.oracle import oracle_maps
        from patchdpo_fast.quality import manifest_maps

        q = self.settings.quality
        pairs = self.path("pairs")
        est_manifest = pairs / "manifest.estimator.jsonl"
        if not est_manifest.is_file():
            shutil.copyfile(pairs / "manifest.jsonl", est_manifest)
        estimator = str(self._train_estimator()) if q.estimator == "world" else q.estimator
        argv = [
            "--manifest",
            str(est_manifest),
            "--estimator",
            estimator,
            "--map-size",
            str(q.map_size),
            "--device",
            "cpu",
            "--threads",
            str(self.settings.threads),
        ]
        if not self.progress:
            argv.append("--no-progress")
        _run_command("quality", manifest_maps.main, argv)

        oracle = Manifest.load(pairs / "manifest.jsonl", check="none")
        oracle.path = pairs / "manifest.oracle.jsonl"
        flipped = Manifest.load(pairs / "manifest.jsonl", check="none")
        flipped.path = pairs / "manifest.flipped.jsonl"
        for pair in oracle.pairs():
            image = load_image(pair.generated).permute(1, 2, 0).numpy()
            q_ref, q_gen, _ = oracle_maps(self.world, pair.subject, pair.prompt, image, q.map_size)
            ref_file, gen_file = oracle.default_map_paths(pair.record_id, pair.k, folder="maps_oracle")
            write_quality_map(ref_file, q_ref)
            write_quality_map(gen_file, q_gen)
            oracle.set_quality_maps(pair.record_id, pair.k, ref_file, gen_file)
            ref_flip, gen_flip = flipped.default_map_paths(pair.record_id, pair.k, folder="maps_flipped")
            write_quality_map(ref_flip, torch.flip(q_ref, (0, 1)))
            write_quality_map(gen_flip, torch.flip(q_gen, (0, 1)))
            flipped.set_quality_maps(pair.record_id, pair.k, ref_flip, gen_flip)
        oracle.header["quality_maps"] = {"estimator": {"kind": "oracle", "source": "patchdpo minibench renderer"}}
        flipped.header["quality_maps"] = {"estimator": {"kind": "oracle, rotated 180 degrees", "source": "control"}}
        oracle.save()
        flipped.save()
        info = {"estimator": q.estimator, **self.map_agreement()}
        logger.info("estimator vs oracle maps: %s", _fmt(info))
        return info

    def map_agreement(self) -> dict[str, Any]:
        """Estimator maps against oracle maps on every pair, overall and on the subject's patches
        (:func:`patchdpo_fast.minibench.oracle.map_agreement`)."""
        from patchdpo_fast.data.files import read_quality_array
        from patchdpo_fast.data.manifest import Manifest
        from patchdpo_fast.minibench.oracle import map_agreement

        pairs = self.path("pairs")
        est_manifest = Manifest.load(pairs / "manifest.estimator.jsonl", check="none")
        estimated = {(p.record_id, p.k): p for p in est_manifest.pairs()}
        rows = []
        for pair in Manifest.load(pairs / "manifest.oracle.jsonl", check="none").pairs():
            est = estimated[(pair.record_id, pair.k)]
            rows.append((pair.subject, pair.prompt, read_quality_array(est.q_gen), read_quality_array(pair.q_gen)))
        return map_agreement(self.world, rows, self.settings.quality.map_size)

    def _train_estimator(self) -> Path:
        """``patchdpo quality-train`` (self-supervised, time-boxed) on clean renders of the training subjects."""
        from patchdpo_fast.data.files import save_image_atomic
        from patchdpo_fast.quality import train_backbone

        images = self.path("world", "quality_images")
        world = self.world
        for si, subject in enumerate(world.train_subjects):
            folder = images / subject.name
            if folder.is_dir():
                continue
            save_image_atomic(_to_uint8(world.render_reference(subject).image), folder / "reference.png")
            for k, scene in enumerate(world.scenes[si % 6 :: 6]):
                render = world.render(subject, scene, seed=2_000_000 + si * 100 + k)
                save_image_atomic(_to_uint8(render.image), folder / f"scene_{k}.png")
        out = self.path("quality_estimator")
        argv = [
            "--images",
            str(images),
            "--out",
            str(out),
            "--minutes",
            str(self.settings.quality.train_minutes),
            "--clock",
            self.settings.quality.train_clock,
            "--recipe",
            self.settings.quality.train_recipe,
            "--reference-scales",
            self.settings.quality.train_reference_scales,
            "--reference-shift",
            str(self.settings.quality.train_reference_shift),
            "--device",
            "cpu",
            "--threads",
            str(self.settings.threads),
        ]
        if not self.progress:
            argv.append("--no-progress")
        _run_command("quality-train", train_backbone.main, argv)
        return out

    # ------------------------------------------------------------------------------------------------ 7. finetune
    def finetune_config(self, variant: Variant, seed: int) -> dict[str, Any]:
        f, res, m = self.settings.finetune, self.world.resolution, self.base_model
        manifest = self.path("pairs", variant.manifest)
        return {
            "model": {
                "tiny": False,
                "pretrained_path": str(m["pretrained"]),
                "image_encoder_path": str(m["image_encoder"]),
                "ip_adapter_path": str(m["ip_adapter"]),
                "num_ip_tokens": self.settings.architecture.num_ip_tokens,
            },
            "data": {
                "source": "manifest",
                "manifest_path": str(manifest),
                "resolution": res,
                "patch_size": res // self.settings.quality.map_size,
                "pairs_per_batch": f.pairs_per_batch,
                "shuffle_seed": seed,
            },
            "loss": {
                "type": variant.loss,
                "beta": f.beta,
                "pair_order": "generated_wins" if variant.control == "swapped" else "reference_wins",
            },
            "optim": {"lr": f.lr, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.01},
            "train": {
                "max_steps": f.steps,
                "seed": seed,
                "export_dtype": "fp32",  # graded as trained
                "unet_export_dtype": "fp32",
                "log_every": max(1, min(10, f.steps)),
                "checkpoint_every": max(1, f.steps // 2),
                "keep_checkpoints": 1,
                "output_dir": str(self.path("finetune", variant.name, f"seed{seed}")),
            },
            "cache": {
                "enabled": True,
                "dir": str(self.path("cache", manifest.stem)),
                "shard_size": 1024,
                "encode_batch_size": 128,
                "on_stale": "rebuild",
            },
        }

    def runs(self) -> list[tuple[Variant, int]]:
        return [(v, s) for v in self.settings.variants() for s in self.settings.finetune.seeds]

    def stage_finetune(self) -> dict[str, Any]:
        """One finetune per objective and seed, from the same base model."""
        results = {}
        runs = self.runs()
        for i, (variant, seed) in enumerate(runs):
            out = self.path("finetune", variant.name, f"seed{seed}")
            if not (out / "summary.json").is_file():
                logger.info("finetune %d/%d: %s, seed %d", i + 1, len(runs), variant.name, seed)
                self._train(f"finetune_{variant.name}_seed{seed}", self.finetune_config(variant, seed))
            summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
            results[f"{variant.name}/seed{seed}"] = {
                k: summary.get(k) for k in ("final_step", "fixed_batch_loss_start", "fixed_batch_loss_end")
            }
        return {"runs": results}

    # ------------------------------------------------------------------------------------------------ 8. evaluate
    def models_to_evaluate(self) -> list[tuple[str, Path, Path, int]]:
        """``(name, base folder, adapter file, seed)``: the untrained model (first seed), the pretrained base model
        and every finetuned one (every seed)."""
        seeds = self.settings.finetune.seeds
        init = self.path("model_init")
        out = [("untrained", init / "base", init / "ip_adapter_init.safetensors", seeds[0])]
        base, adapter = self.base_model["pretrained"], self.base_model["ip_adapter"]
        out += [("base", base, adapter, s) for s in seeds]
        for variant, seed in self.runs():
            run = self.path("finetune", variant.name, f"seed{seed}")
            out.append((variant.name, base, run / "ip_adapter.safetensors", seed))
        return out

    def stage_evaluate(self) -> dict[str, Any]:
        """Generate the held-out subjects in the evaluation scenes with every model and grade the images."""
        from patchdpo_fast.minibench.evaluation import evaluate_adapter
        from patchdpo_fast.minibench.judges import load_judges

        judges = load_judges(self.path("judges"))
        todo = self.models_to_evaluate()
        summaries: dict[str, Any] = {}
        for i, (name, base, adapter, seed) in enumerate(todo):
            target = self.path("eval", name, f"seed{seed}")
            if not (target / "metrics.json").is_file():
                logger.info("evaluate %d/%d: %s, seed %d", i + 1, len(todo), name, seed)
                evaluate_adapter(self, judges, base, adapter, seed, target)
            summaries[f"{name}/seed{seed}"] = json.loads((target / "metrics.json").read_text())["summary"]
        return {"models": summaries}

    # ------------------------------------------------------------------------------------------------ curve
    def learning_curve(self) -> dict[str, Any]:
        """Grade every kept pretraining checkpoint on the held-out set (``pretrain.curve_every > 0``).

        Writes ``curve.json`` and ``curve.md`` into the run folder: identity, detail and prompt metrics against
        pretraining steps, with the wall time of the run so far, for choosing the model size and step count.
        """
        from patchdpo_fast.minibench.evaluation import evaluate_checkpoint
        from patchdpo_fast.minibench.judges import load_judges

        judges = load_judges(self.path("judges"))
        curve_file = self.path("curve.json")
        curve = json.loads(curve_file.read_text()) if curve_file.is_file() else {}
        metrics = [json.loads(x) for x in self.path("pretrain", "metrics.jsonl").read_text().splitlines() if x]
        for ckpt in sorted(self.path("pretrain", "checkpoints").glob("step_*")):
            step = int(ckpt.name.split("_")[1])
            if str(step) in curve or not (ckpt / "unet.safetensors").is_file():
                continue
            logger.info("learning curve: grading the checkpoint at step %d", step)
            summary = evaluate_checkpoint(self, judges, ckpt, seed=0)
            window = [m["loss"] for m in metrics if step - self.settings.pretrain.curve_every < m["step"] <= step]
            curve[str(step)] = {**summary, "loss": float(np.mean(window)) if window else None}
            atomic_write_json(curve_file, curve)
        keys = ("loss", "id_sim", "id_acc", "detail_acc", "global_acc", "prompt_acc", "subject_l1")
        lines = [
            f"# Pretraining learning curve ({self.settings.size} model)",
            "",
            "| step | " + " | ".join(keys) + " |",
            "|---:|" + "---:|" * len(keys),
        ]
        for step in sorted(curve, key=int):
            row = curve[step]
            lines.append(
                f"| {step} | "
                + " | ".join(f"{row[k]:.3f}" if isinstance(row.get(k), float) else "-" for k in keys)
                + " |"
            )
        atomic_write_text(self.path("curve.md"), "\n".join(lines) + "\n")
        return curve

    # ------------------------------------------------------------------------------------------------ 9. report
    def stage_report(self) -> dict[str, Any]:
        """Table, sanity checks and figures."""
        from patchdpo_fast.minibench.report import write_report

        return write_report(self)


# --- helpers
def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _fmt(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


# --- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchdpo minibench",
        description="PatchDPO's comparison in a miniature world learnt from scratch on the CPU: pretrain a small "
        "IP-Adapter-Plus, build pairs, weight them (estimator and oracle maps), finetune under each objective and "
        "grade held-out subjects. Resumable: rerun the same command to continue.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/minibench"), help="run folder (default runs/minibench)")
    p.add_argument(
        "--preset",
        choices=("default", "smoke"),
        default="default",
        help="'default': the benchmark (~1 h on 2 cores); 'smoke': every stage at toy size (CI)",
    )
    p.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    p.add_argument("--seeds", type=int, default=None, help="number of finetuning seeds (default: the preset's)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: the preset's)")
    p.add_argument(
        "--pair-only-subjects",
        type=int,
        default=None,
        metavar="N",
        help="leave the last N training subjects out of pretraining and build the pairs on them only (default 0)",
    )
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: the preset's)")
    p.add_argument(
        "--curve",
        type=int,
        default=None,
        metavar="N",
        help="learning-curve mode: pretrain, keeping a checkpoint every N steps, grade each, then stop",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument(
        "--publish",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy report.md, results.json and the figures here (e.g. benchmarks/results/minibench)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run folder first and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``patchdpo minibench``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = preset("smoke" if args.smoke else args.preset)
    if args.seeds is not None:
        if args.seeds < 1:
            print("patchdpo minibench: --seeds must be >= 1", file=sys.stderr)
            return 2
        settings.finetune.seeds = tuple(range(args.seeds))
    if args.threads is not None:
        settings.threads = args.threads
    if args.size is not None:
        settings.size = args.size
    if args.pretrain_steps is not None:
        settings.pretrain.steps = args.pretrain_steps
    if args.pair_only_subjects is not None:
        settings.world.pair_only_subjects = args.pair_only_subjects
    if args.curve is not None:
        settings.pretrain.curve_every = settings.pretrain.checkpoint_every = args.curve
    try:
        bench = Minibench(args.out, settings, overwrite=args.overwrite, progress=not args.no_progress)
        if args.curve is not None:
            bench.run(until="pretrain")
            bench.learning_curve()
            print(bench.path("curve.md").read_text(encoding="utf-8"))
            return 0
        infos = bench.run(until=args.until)
    except (ValueError, FileNotFoundError, CommandError) as exc:
        print(f"patchdpo minibench: {exc}", file=sys.stderr)
        return 2
    if args.publish is not None and "report" in infos:
        from patchdpo_fast.minibench.report import publish

        publish(bench, args.publish)
    if "report" in infos:
        print(bench.path("report.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
