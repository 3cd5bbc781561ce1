"""``patchdpo evaluate``: DINO, CLIP-I and CLIP-T of a generated DreamBench folder, with the paper's rows beside.

::

    patchdpo evaluate --generated runs/eval/patchdpo_all --references data/dreambench \\
        --dino-model pretrained/dino-vits16 --clip-model pretrained/clip-vit-base-patch32 --out scores.json

Reads ``<generated>/<subject>/<prompt>.png`` (checked first: every expected image must exist) and the reference
photos ``<references>/<subject>/*``, computes the metrics of :mod:`patchdpo_fast.eval.metrics` and writes

* ``FILE.json``: overall and per-subject scores (and per prompt), the selection, the models, the paper rows;
* ``FILE.md``: the paper's table format with the published rows of the setting and ours, then per subject;
* ``FILE.png``: a per-subject bar chart.

``--setting all`` compares every generated image with every reference photo of its subject; ``--setting single``
with the subject's Kosmos-G-selected photo only. The selection (subjects, prompts per subject) defaults to the one
recorded by ``patchdpo generate`` in the folder, else the full protocol (30 x 25).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.data.files import check_images
from patchdpo_fast.utils import resolve_device

from ._io import atomic_write_json, atomic_write_text
from .dreambench import (
    PAPER_RESULTS,
    DreamBenchProtocol,
    check_layout,
    find_prompts_file,
    parse_prompts_file,
    parse_subject_list,
    read_run_record,
    reference_images,
    selected_reference,
)
from .metrics import EvalModels, build_eval_models, embed_clip_images, embed_clip_texts, embed_dino, subject_scores
from .report import METRICS, bar_chart, markdown_report

__all__ = ["evaluate_dreambench", "main", "write_outputs"]

SCORES_FORMAT = "patchdpo-dreambench-scores"


def evaluate_dreambench(
    generated_dir: str | Path,
    references_dir: str | Path,
    models: EvalModels,
    *,
    setting: str = "all",
    protocol: DreamBenchProtocol | None = None,
    prompts_file: str | Path | None = None,
    subjects: Sequence[str] | None = None,
    prompts_limit: int | None = None,
    selection: dict[str, str] | None = None,
    batch_size: int = 32,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score a generated DreamBench folder; returns the JSON-ready result (see ``docs/dreambench.md``).

    Args:
        generated_dir: ``<subject>/<prompt>.png`` images.
        references_dir: ``<subject>/*`` reference photos (the prompts file is looked up here unless given).
        models: from :func:`~patchdpo_fast.eval.metrics.build_eval_models`.
        setting: ``"all"`` (every reference photo) or ``"single"`` (the selected photo per subject).
        protocol / prompts_file: the protocol, or the file to read it from.
        subjects, prompts_limit: the selection to score (default: all subjects, all prompts).
        selection: subject -> photo stem of the single setting (default Kosmos-G's).
        batch_size: images per forward pass.
        log: called with one progress line per subject.

    Raises:
        LayoutError: generated images are missing (all listed).
        FileNotFoundError: reference folders or photos are missing (all listed).
    """
    if setting not in ("all", "single"):
        raise ValueError(f"setting must be 'all' or 'single', got {setting!r}")
    if protocol is None:
        protocol = parse_prompts_file(find_prompts_file(references_dir, prompts_file))
    layout = check_layout(generated_dir, protocol, subjects, prompts_limit)
    groups = layout.by_subject()

    refs: dict[str, list[Path]] = {}
    problems = []
    for name in groups:
        try:
            refs[name] = (
                [selected_reference(references_dir, name, selection)]
                if setting == "single"
                else reference_images(references_dir, name)
            )
        except (FileNotFoundError, KeyError) as exc:
            problems.append(str(exc).strip("\"'"))
    if problems:
        raise FileNotFoundError(f"reference photos missing in {references_dir}:\n  " + "\n  ".join(problems))
    # every image decodes (a truncated file is named here, not deep inside a model's preprocessing)
    check_images([p for paths in refs.values() for p in paths], "reference photo")
    check_images([p for entries in groups.values() for _, p in entries], "generated image")

    per_subject: dict[str, Any] = {}
    for name, entries in groups.items():
        subject = protocol.subject(name)
        gen_paths = [p for _, p in entries]
        prompts = [item.prompt for item, _ in entries]
        scores = subject_scores(
            embed_dino(models, gen_paths, batch_size),
            embed_dino(models, refs[name], batch_size),
            embed_clip_images(models, gen_paths, batch_size),
            embed_clip_images(models, refs[name], batch_size),
            embed_clip_texts(models, prompts, batch_size),
        )
        per_image = scores.pop("per_image")
        per_subject[name] = {
            "class": subject.class_name,
            "live": subject.live,
            "num_generated": len(gen_paths),
            "num_references": len(refs[name]),
            "references": [p.name for p in refs[name]],
            **scores,
            "per_prompt": {prompt: {key: per_image[key][k] for key, _ in METRICS} for k, prompt in enumerate(prompts)},
        }
        if log is not None:
            s = per_subject[name]
            log(f"{name}: DINO {s['dino']:.4f}  CLIP-I {s['clip_i']:.4f}  CLIP-T {s['clip_t']:.4f}")

    overall = {
        key: float(torch.tensor([s[key] for s in per_subject.values()], dtype=torch.float64).mean())
        for key, _ in METRICS
    }
    complete = len(layout.items) == len(protocol.items())
    return {
        "format": SCORES_FORMAT,
        "version": 1,
        "setting": setting,
        "overall": overall,
        "num_subjects": len(per_subject),
        "num_images": len(layout.items),
        "complete_protocol": complete,
        "selection": {
            "subjects": list(per_subject),
            "num_subjects": len(per_subject),
            "prompts_limit": prompts_limit,
            "single_reference": {n: refs[n][0].stem for n in per_subject} if setting == "single" else None,
        },
        "generated_dir": str(generated_dir),
        "references_dir": str(references_dir),
        "prompts_file": protocol.source,
        "models": dict(models.identity or {}),
        "paper": [
            {"method": m, "dino": d, "clip_i": ci, "clip_t": ct} for m, d, ci, ct in PAPER_RESULTS.get(setting, [])
        ],
        "unexpected_files": layout.unexpected_files,
        "per_subject": per_subject,
    }


def write_outputs(
    result: dict[str, Any],
    json_path: str | Path,
    markdown_path: str | Path | None = None,
    chart_path: str | Path | None = None,
    label: str = "ours",
) -> tuple[Path, Path, Path]:
    """Write the JSON, the markdown (default ``FILE.md``) and the bar chart (default ``FILE.png``) atomically."""
    json_path = Path(json_path)
    markdown_path = Path(markdown_path) if markdown_path else json_path.with_suffix(".md")
    chart_path = Path(chart_path) if chart_path else json_path.with_suffix(".png")
    atomic_write_json(json_path, result)
    atomic_write_text(markdown_path, markdown_report(result, label))
    bar_chart(result, chart_path, title=f"DreamBench per subject: {label} ({result['setting']} references)")
    return json_path, markdown_path, chart_path


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The ``patchdpo evaluate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="patchdpo evaluate",
        description="DreamBench DINO / CLIP-I / CLIP-T of generated images, with the paper's rows beside.",
    )
    parser.add_argument("--generated", type=Path, required=True, help="folder of <subject>/<prompt>.png images")
    parser.add_argument("--references", type=Path, required=True, help="DreamBench folder: <subject>/NN.jpg photos")
    parser.add_argument("--out", type=Path, required=True, help="scores JSON; FILE.md and FILE.png are written beside")
    parser.add_argument(
        "--setting",
        choices=("all", "single"),
        help="all reference photos, or the Kosmos-G-selected one (default: the generation mode "
        "recorded in --generated, else all)",
    )
    parser.add_argument("--dino-model", type=Path, help="local DINO ViT-S/16 folder (transformers ViTModel)")
    parser.add_argument("--clip-model", type=Path, help="local CLIP ViT-B/32 folder (CLIPModel + tokenizer)")
    parser.add_argument("--tiny", action="store_true", help="tiny random DINO/CLIP models (tests; meaningless scores)")
    parser.add_argument("--tiny-seed", type=int, default=0, help="initialization seed of the tiny models")
    parser.add_argument("--prompts-file", type=Path, help="prompts_and_classes.txt (default: in --references)")
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: as generated, else all)")
    parser.add_argument("--prompts-limit", type=int, help="only the first N prompts per subject")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="model dtype (default fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--label", help="name of our row in the table (default: the adapter file name, else 'ours')")
    parser.add_argument("--markdown", type=Path, help="markdown path (default FILE.md)")
    parser.add_argument("--chart", type=Path, help="bar chart path (default FILE.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``patchdpo evaluate``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny == bool(args.dino_model or args.clip_model):
        parser.error("pass --tiny, or --dino-model and --clip-model (local folders)")
    if not args.tiny and not (args.dino_model and args.clip_model):
        parser.error("--dino-model and --clip-model are both required without --tiny")
    if args.out.suffix.lower() != ".json":
        parser.error(f"--out must be a .json file, got {args.out}")

    record = read_run_record(args.generated) or {}
    subjects, limit = parse_subject_list(args.subjects), args.prompts_limit
    if subjects is None and limit is None and record.get("selection"):
        subjects = record["selection"].get("subjects")
        limit = record["selection"].get("prompts_limit")
    setting = args.setting or record.get("settings", {}).get("mode") or "all"
    label = args.label
    if label is None:
        adapter = (record.get("model") or {}).get("ip_adapter") or {}
        label = Path(adapter["path"]).stem if adapter.get("path") else "ours"

    models = build_eval_models(
        tiny=args.tiny,
        dino_model=args.dino_model,
        clip_model=args.clip_model,
        device=resolve_device(args.device) if args.device else None,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        seed=args.tiny_seed,
    )
    result = evaluate_dreambench(
        args.generated,
        args.references,
        models,
        setting=setting,
        prompts_file=args.prompts_file,
        subjects=subjects,
        prompts_limit=limit,
        batch_size=args.batch_size,
        log=lambda line: print(line, file=sys.stderr),
    )
    if record:
        result["generation"] = {k: record.get(k) for k in ("settings", "model", "selection")}
    paths = write_outputs(result, args.out, args.markdown, args.chart, label=label)
    print(markdown_report(result, label).split("\n### Per subject")[0].rstrip())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("evaluate", main))
