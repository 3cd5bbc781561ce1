"""``patchdpo generate``: generate the DreamBench protocol with an IP-Adapter-Plus adapter on SDXL.

::

    patchdpo generate --references data/dreambench --out runs/eval/patchdpo_all \\
        --pretrained pretrained/RealVisXL_V1.0 --image-encoder pretrained/image_encoder \\
        --ip-adapter runs/patchdpo/ip_adapter.safetensors [--mode all|single]

For every subject of ``prompts_and_classes.txt`` (30) and each of its 25 prompts (object or live-subject list;
class word in place of the subject, no unique token) one image is written to ``<out>/<subject>/<prompt>.png``
(see :mod:`patchdpo_fast.eval.dreambench`). The model is this library's pipeline
(:func:`patchdpo_fast.generation.build_pipeline`: stock ``StableDiffusionXLPipeline`` around our IP-Adapter-Plus,
which loads this library's export or any IP-Adapter-Plus checkpoint, ``.safetensors`` or official ``.bin``).

* ``--mode all``: the IP tokens are averaged over all of a subject's reference photos (the official inference);
  ``--mode single``: only the Kosmos-G-selected photo of the subject is used (the Kosmos-G setting).
* Defaults follow the official inference script: IP scale 0.6, 30 steps, guidance 5.0, the IP-Adapter negative
  prompt, the same seed (42) for every image, 1024 px (the pipeline's default size).
* Resumable: images are written atomically and existing ones are skipped; the settings are recorded in
  ``<out>/dreambench_run.json`` and a rerun with different settings or model is refused.
* Sharded: items (protocol order) are grouped into chunks of ``--batch-size`` consecutive prompts of one subject;
  chunk ``c`` belongs to shard ``c mod n`` (``--shard i/n`` or ``RANK`` / ``WORLD_SIZE``).
* A contact sheet per subject (references above, generations below) goes to ``<out>/_contact_sheets/``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchdpo_fast.data.files import check_images
from patchdpo_fast.errors import UserError
from patchdpo_fast.generation import DEFAULT_NEGATIVE_PROMPT
from patchdpo_fast.utils import parse_shard

from ._io import atomic_write_json
from .dreambench import (
    RUN_RECORD_NAME,
    DreamBenchItem,
    DreamBenchProtocol,
    find_prompts_file,
    parse_prompts_file,
    parse_subject_list,
    read_run_record,
    reference_images,
    selected_reference,
)
from .report import contact_sheet

__all__ = [
    "CONTACT_SHEET_DIR",
    "DEFAULT_NEGATIVE_PROMPT",
    "GenerateResult",
    "generate_dreambench",
    "main",
    "parse_shard",
]

#: IP-Adapter's default negative prompt (used by the official DreamBench inference).

#: Folder (under the output root) of the per-subject contact sheets.
CONTACT_SHEET_DIR = "_contact_sheets"

RUN_FORMAT = "patchdpo-dreambench-run"


@dataclass
class GenerateResult:
    """What one :func:`generate_dreambench` call did."""

    out_dir: Path
    shard: tuple[int, int]
    total_items: int
    shard_items: int
    generated: list[Path] = field(default_factory=list)
    skipped: int = 0
    contact_sheets: list[Path] = field(default_factory=list)
    complete: bool = False  # every item of the selection (all shards) exists


def _chunks(items: list[DreamBenchItem], batch_size: int) -> list[list[DreamBenchItem]]:
    chunks: list[list[DreamBenchItem]] = []
    for item in items:
        if chunks and chunks[-1][0].subject == item.subject and len(chunks[-1]) < batch_size:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def _exists(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _record_selection(old: dict[str, Any] | None, protocol: DreamBenchProtocol, subjects: list[str], limit: int | None):
    if old is None:
        return {"subjects": subjects, "prompts_limit": limit}
    union = set(old.get("subjects") or []) | set(subjects)
    old_limit = old.get("prompts_limit")
    merged_limit = None if old_limit is None or limit is None else max(int(old_limit), limit)
    return {"subjects": [n for n in protocol.subject_names if n in union], "prompts_limit": merged_limit}


def _write_run_record(
    out: Path, protocol: DreamBenchProtocol, references_dir: Path, settings: dict, model: dict, selection: dict
) -> None:
    old = read_run_record(out)
    if old is not None:
        diffs = [
            f"{group}.{k}: {old.get(group, {}).get(k)!r} -> {new.get(k)!r}"
            for group, new in (("settings", settings), ("model", model))
            for k in sorted(set(old.get(group, {})) | set(new))
            if old.get(group, {}).get(k) != new.get(k)
        ]
        if diffs:
            raise ValueError(
                f"{out / RUN_RECORD_NAME} was written with other settings; use a new --out (or delete the folder):\n  "
                + "\n  ".join(diffs)
            )
    record = {
        "format": RUN_FORMAT,
        "version": 1,
        "settings": settings,
        "model": model,
        "selection": _record_selection(
            old and old.get("selection"), protocol, selection["subjects"], selection["prompts_limit"]
        ),
        "prompts_file": str(Path(protocol.source).resolve()) if protocol.source else None,
        "references_dir": str(references_dir.resolve()),
    }
    atomic_write_json(out / RUN_RECORD_NAME, record)


def generate_dreambench(
    protocol: DreamBenchProtocol,
    references_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    pipe: Any = None,
    pipe_factory: Callable[[], Any] | None = None,
    mode: str = "all",
    subjects: Sequence[str] | None = None,
    prompts_limit: int | None = None,
    ip_scale: float = 0.6,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 42,
    resolution: int = 1024,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    batch_size: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    contact_sheets: bool = True,
    model_identity: dict[str, Any] | None = None,
) -> GenerateResult:
    """Generate this shard's missing DreamBench images (see the module docstring).

    Args:
        protocol: from :func:`~patchdpo_fast.eval.dreambench.parse_prompts_file`.
        references_dir: ``<subject>/<NN>.jpg`` reference photos.
        out_dir: output root (``<out>/<subject>/<prompt>.png``).
        pipe: a pipeline from :func:`patchdpo_fast.generation.build_pipeline`; or ``pipe_factory``, called only
            when something has to be generated (a finished run loads no model).
        mode: ``"all"`` (IP tokens averaged over all reference photos) or ``"single"`` (Kosmos-G-selected photo).
        subjects, prompts_limit: restrict the protocol (subject names; first ``prompts_limit`` prompts each).
        ip_scale, steps, guidance, seed, resolution, negative_prompt: sampling settings (every image uses ``seed``).
        batch_size: prompts of one subject per pipeline call.
        shard: ``(i, n)``: this process generates chunks ``c`` with ``c mod n == i``.
        progress: tqdm progress bar.
        contact_sheets: write ``<out>/_contact_sheets/<subject>.png`` for subjects whose images are all present.
        model_identity: what identifies the model (recorded and compared on resume).

    Raises:
        ValueError: bad arguments, ``out_dir`` holds a run with other settings, or unreadable reference photos.
        KeyError / FileNotFoundError: unknown subjects, missing reference folders or selected photos.
    """
    from tqdm.auto import tqdm

    if mode not in ("all", "single"):
        raise ValueError(f"mode must be 'all' or 'single', got {mode!r}")
    if pipe is None and pipe_factory is None:
        raise ValueError("pass pipe or pipe_factory")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prompts_limit is not None and prompts_limit < 1:
        raise ValueError(f"prompts_limit must be >= 1, got {prompts_limit}")
    references_dir, out = Path(references_dir), Path(out_dir)
    index, count = shard
    chosen = [s.name for s in protocol.select_subjects(subjects)]
    items = protocol.items(chosen, prompts_limit)
    refs: dict[str, list[Path]] = {}
    for name in chosen:  # fail early, before any model is built, when references are missing
        refs[name] = (
            [selected_reference(references_dir, name)] if mode == "single" else reference_images(references_dir, name)
        )
    check_images([p for paths in refs.values() for p in paths], "reference photo")  # ... or unreadable

    settings = {
        "mode": mode,
        "ip_scale": float(ip_scale),
        "steps": int(steps),
        "guidance": float(guidance),
        "seed": int(seed),
        "resolution": int(resolution),
        "negative_prompt": negative_prompt,
    }
    _write_run_record(
        out,
        protocol,
        references_dir,
        settings,
        dict(model_identity or {}),
        {"subjects": chosen, "prompts_limit": prompts_limit},
    )

    my_chunks = [c for k, c in enumerate(_chunks(items, batch_size)) if k % count == index]
    result = GenerateResult(out, (index, count), len(items), sum(len(c) for c in my_chunks))
    pending = [[i for i in c if not _exists(out / i.subject / i.file_name)] for c in my_chunks]
    result.skipped = result.shard_items - sum(len(c) for c in pending)
    touched: set[str] = set()
    todo = sum(len(c) for c in pending)
    if todo:
        from PIL import Image

        from patchdpo_fast.data.files import save_image_atomic
        from patchdpo_fast.generation import generate

        if pipe is None:
            pipe = pipe_factory()
        loaded: dict[str, list[Image.Image]] = {}
        bar = tqdm(total=todo, desc=f"dreambench {index}/{count}", unit="img", disable=not progress)
        try:
            for chunk in pending:
                if not chunk:
                    continue
                subject = chunk[0].subject
                if subject not in loaded:
                    loaded[subject] = []
                    for p in refs[subject]:
                        with Image.open(p) as img:
                            loaded[subject].append(img.convert("RGB"))
                images = generate(
                    pipe,
                    [loaded[subject]] * len(chunk),
                    [i.prompt for i in chunk],
                    ip_scale=ip_scale,
                    steps=steps,
                    guidance=guidance,
                    seed=[seed] * len(chunk),
                    resolution=resolution,
                    negative_prompt=negative_prompt,
                    reference_mode=mode,
                )
                for item, image in zip(chunk, images, strict=True):
                    path = out / item.subject / item.file_name
                    save_image_atomic(image, path)
                    result.generated.append(path)
                    bar.update(1)
                touched.add(subject)
        finally:
            bar.close()

    by_subject: dict[str, list[DreamBenchItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    result.complete = all(_exists(out / i.subject / i.file_name) for i in items)
    if contact_sheets:
        mine = {c[0].subject for c in my_chunks}
        for subject in chosen:
            sheet = out / CONTACT_SHEET_DIR / f"{subject}.png"
            subject_items = by_subject[subject]
            if subject not in mine or not all(_exists(out / i.subject / i.file_name) for i in subject_items):
                continue
            if subject in touched or not sheet.is_file():
                contact_sheet(
                    refs[subject],
                    [(i.prompt, out / i.subject / i.file_name) for i in subject_items],
                    sheet,
                    title=f"{subject} ({protocol.subject(subject).class_name}) - {mode} reference(s)",
                )
                result.contact_sheets.append(sheet)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``patchdpo generate`` argument parser."""
    from patchdpo_fast.generation import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="patchdpo generate",
        description="Generate the DreamBench protocol (<out>/<subject>/<prompt>.png) with an IP-Adapter-Plus adapter.",
    )
    parser.add_argument("--references", type=Path, required=True, help="DreamBench folder: <subject>/NN.jpg photos")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--prompts-file", type=Path, help="prompts_and_classes.txt (default: in --references)")
    parser.add_argument(
        "--mode",
        choices=("all", "single"),
        default="all",
        help="all: IP tokens averaged over all reference photos; single: Kosmos-G-selected photo",
    )
    parser.add_argument("--subjects", nargs="+", help="only these subjects (comma or space separated)")
    parser.add_argument("--prompts-limit", type=int, help="only the first N prompts of each subject")
    parser.add_argument("--ip-scale", type=float, default=0.6, help="IP-Adapter scale (default 0.6)")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default 5.0)")
    parser.add_argument("--seed", type=int, default=42, help="seed of every image (default 42)")
    parser.add_argument("--resolution", type=int, default=1024, help="output side in pixels (default 1024)")
    parser.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help="negative prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    parser.add_argument("--shard", help="i/n: this process's shard (default: RANK/WORLD_SIZE, else 0/1)")
    parser.add_argument("--no-contact-sheets", action="store_true", help="do not write contact sheets")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``patchdpo generate``; returns the exit status."""
    from patchdpo_fast.generation import build_pipeline, check_model_arguments, model_identity, models_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny == bool(args.pretrained or args.image_encoder):
        parser.error("pass --tiny, or --pretrained and --image-encoder (local folders)")
    if not args.tiny and not (args.pretrained and args.image_encoder):
        parser.error("--pretrained and --image-encoder are both required without --tiny")
    if not args.tiny and args.ip_adapter is None:
        parser.error("--ip-adapter is required with --pretrained (an untrained adapter generates noise)")
    check_model_arguments(args)
    shard = parse_shard(args.shard)
    protocol = parse_prompts_file(find_prompts_file(args.references, args.prompts_file))

    def factory():
        try:
            return build_pipeline(models_from_args(args), scheduler=args.scheduler)
        except KeyError as exc:  # weights of another layout in --ip-adapter
            raise UserError(f"--ip-adapter {args.ip_adapter}: {exc.args[0] if exc.args else exc}") from None

    result = generate_dreambench(
        protocol,
        args.references,
        args.out,
        pipe_factory=factory,
        mode=args.mode,
        subjects=parse_subject_list(args.subjects),
        prompts_limit=args.prompts_limit,
        ip_scale=args.ip_scale,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        resolution=args.resolution,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        shard=shard,
        progress=not args.no_progress,
        contact_sheets=not args.no_contact_sheets,
        model_identity=model_identity(args),
    )
    print(
        f"shard {shard[0]}/{shard[1]}: {len(result.generated)} generated, {result.skipped} already present "
        f"({result.shard_items} of {result.total_items} items in this shard); "
        f"{len(result.contact_sheets)} contact sheets; protocol {'complete' if result.complete else 'incomplete'}"
    )
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("generate", main))
