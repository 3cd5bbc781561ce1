"""``patchdpo build-pairs``: generate PatchDPO training pairs with the pre-trained personalized model.

From a folder of reference images and a prompt list, generate ``K`` images per (reference, prompt) with the
IP-Adapter-Plus pipeline (:mod:`patchdpo_fast.generation`, tiny or from local weights) and write the images and a
manifest (:mod:`patchdpo_fast.data.manifest`)::

    patchdpo build-pairs --references refs/ --prompts prompts.txt --out data/pairs --num-images 2 \\
        --pretrained pretrained/RealVisXL_V1.0 --image-encoder pretrained/image_encoder \\
        --ip-adapter pretrained/ip-adapter-plus_sdxl_vit-h.safetensors

**Inputs.** ``--references``: one subfolder per subject holding its images (``refs/dog/00.jpg``), and/or images
directly in the folder (each its own subject, named by its file stem). ``--prompts``: one prompt per line (blank
lines and ``#`` comments ignored) where ``{}`` / ``{class}`` / ``{1}`` stand for the subject's class word and
``{0}`` / ``{token}`` for ``--unique-token`` (default empty); or DreamBench's ``prompts_and_classes.txt`` (class
table, object prompts, live-subject prompts for the ``--live-classes``). A subject's class comes from that table,
else from ``--classes`` (``subject,class`` lines), else from its name (``_`` as spaces, trailing digits dropped).

**Work plan.** Items are (subject, reference, prompt) in sorted order; item ``(s, r, j)`` has id
``{subject}/{reference stem}/{j:03d}`` and writes ``images/{subject}/{reference stem}/{j:03d}_{k}.png``, image
``k`` drawn with a seed hashed from ``(--seed, subject, reference file name, prompt, k)``. Items are grouped into
chunks of ``--batch-size`` consecutive items (one pipeline call each); chunk ``c`` belongs to shard ``c mod n``.
Batch composition therefore never depends on the number of shards or on interruptions, and a 2-shard run writes
the same files and records as a 1-shard run.

**Resumable.** Images are written atomically; an item is complete when its ``K`` images exist. A rerun with the
same settings (checked against ``build_pairs.json``) skips complete items and regenerates only incomplete chunks;
its manifest records are derived from the files, so nothing is duplicated. Each shard (``--shard i/n``, or the
``RANK`` / ``WORLD_SIZE`` environment of torchrun) writes ``manifest.part-{i}-of-{n}.jsonl`` (atomically,
after the images of its records exist, every ``--flush-seconds`` and at exit). When all items are complete the
parts are merged into ``manifest.jsonl`` (automatically by the last shard to finish, or with ``--merge``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchdpo_fast.data.files import IMAGE_SUFFIXES, atomic_write_bytes, check_images, save_image_atomic
from patchdpo_fast.data.manifest import GeneratedImage, Manifest, ManifestRecord, merge_manifests, relative_path
from patchdpo_fast.generation import DEFAULT_NEGATIVE_PROMPT
from patchdpo_fast.utils import parse_shard

__all__ = [
    "DEFAULT_LIVE_CLASSES",
    "BuildResult",
    "PairItem",
    "PromptSpec",
    "Subject",
    "build_pairs",
    "discover_subjects",
    "format_prompt",
    "image_seed",
    "main",
    "make_plan",
    "merge_parts",
    "read_prompt_file",
]

logger = logging.getLogger(__name__)

SETTINGS_NAME = "build_pairs.json"
MANIFEST_NAME = "manifest.jsonl"
DEFAULT_LIVE_CLASSES: tuple[str, ...] = ("dog", "cat")
DEFAULT_NEGATIVE = DEFAULT_NEGATIVE_PROMPT

_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_CLASS_KEYS = {"", "class", "1"}
_TOKEN_KEYS = {"0", "token"}


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PromptSpec:
    """Prompt templates (see :func:`format_prompt`) and, for DreamBench files, the subject classes."""

    object_prompts: list[str]
    live_prompts: list[str] | None = None
    classes: dict[str, str] = field(default_factory=dict)

    def templates(self, class_name: str, live_classes: Sequence[str] = DEFAULT_LIVE_CLASSES) -> list[str]:
        """The templates for a subject of ``class_name`` (live-subject prompts for the live classes)."""
        if self.live_prompts is not None and class_name in live_classes:
            return self.live_prompts
        return self.object_prompts


def format_prompt(template: str, class_name: str, token: str = "") -> str:
    """Fill a prompt template: ``{}`` / ``{class}`` / ``{1}`` -> class word, ``{0}`` / ``{token}`` -> unique token.

    Runs of spaces left by an empty token collapse to one. Unknown placeholders raise ``ValueError``.
    """

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in _CLASS_KEYS:
            return class_name
        if key in _TOKEN_KEYS:
            return token
        raise ValueError(f"unknown placeholder {{{key}}} in prompt {template!r} (use {{}}, {{class}} or {{token}})")

    return re.sub(r"\s+", " ", _PLACEHOLDER.sub(fill, template)).strip()


_DREAMBENCH_ENTRY = re.compile(r"""^\s*(['"])(.*?)\1\s*\.format\(""")


def read_prompt_file(path: str | os.PathLike[str]) -> PromptSpec:
    """Read a prompt list: one template per line, or DreamBench's ``prompts_and_classes.txt``.

    Raises:
        ValueError: no prompts, or a template with an unknown placeholder.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if "prompt_list" in text:
        spec = PromptSpec(object_prompts=[], live_prompts=[])
        section = None
        target: list[str] | None = None
        for raw in text.splitlines():
            line = raw.strip()
            lowered = line.lower()
            if lowered == "classes":
                section = "classes"
            elif lowered == "prompts":
                section = "prompts"
            elif lowered == "object prompts":
                target = spec.object_prompts
            elif lowered == "live subject prompts":
                target = spec.live_prompts
            elif section == "classes" and "," in line and lowered != "subject_name,class":
                name, _, cls = line.partition(",")
                spec.classes[name.strip()] = cls.strip()
            elif target is not None:
                match = _DREAMBENCH_ENTRY.match(line)
                if match:
                    target.append(match.group(2))
        if not spec.live_prompts:
            spec.live_prompts = None
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        spec = PromptSpec(object_prompts=prompts)
    if not spec.object_prompts:
        raise ValueError(f"no prompts found in {path}")
    for template in spec.object_prompts + (spec.live_prompts or []):
        format_prompt(template, "x", "y")  # unknown placeholders fail here, before any generation
    return spec


def read_classes_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``subject,class`` lines (a ``subject_name,class`` header line and ``#`` comments are skipped)."""
    out = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.lower() == "subject_name,class" or "," not in line:
            continue
        name, _, cls = line.partition(",")
        out[name.strip()] = cls.strip()
    return out


def class_from_name(subject: str) -> str:
    """A class word guessed from a subject name: ``red_cartoon`` -> ``red cartoon``, ``dog2`` -> ``dog``."""
    guess = re.sub(r"\d+$", "", subject).replace("_", " ").replace("-", " ").strip()
    return guess or subject


# ----------------------------------------------------------------------------------------------------------------
# References and the work plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A subject: its name (folder name or file stem) and reference images (sorted)."""

    name: str
    references: tuple[Path, ...]


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def discover_subjects(folder: str | os.PathLike[str], max_references: int | None = None) -> list[Subject]:
    """Subjects of a reference folder: one per subfolder with images, one per image directly in ``folder``.

    Raises:
        FileNotFoundError: no such folder. ValueError: no images, two subjects with one name, or two references
        of a subject with the same file stem.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"reference folder not found: {root}")
    subjects: dict[str, Subject] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images_in(sub)
        if images:
            subjects[sub.name] = Subject(sub.name, tuple(images[:max_references] if max_references else images))
    for image in _images_in(root):
        if image.stem in subjects:
            raise ValueError(f"subject name {image.stem!r} is both a folder and an image in {root}")
        subjects[image.stem] = Subject(image.stem, (image,))
    if not subjects:
        raise ValueError(f"no reference images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its subfolders")
    for subject in subjects.values():
        stems = [p.stem for p in subject.references]
        if len(set(stems)) != len(stems):
            raise ValueError(f"subject {subject.name!r} has references with the same file stem: {stems}")
    return [subjects[name] for name in sorted(subjects)]


@dataclass(frozen=True)
class PairItem:
    """One (subject, reference, prompt) work item; its ``K`` images are ``image_paths``."""

    index: int
    id: str
    subject: str
    class_name: str
    reference: Path
    reference_index: int
    prompt_index: int
    prompt: str
    image_paths: tuple[str, ...]
    seeds: tuple[int, ...]


def image_seed(base_seed: int, subject: str, reference_name: str, prompt: str, k: int) -> int:
    """Deterministic 63-bit seed of generated image ``k`` of an item (independent of item order and sharding)."""
    key = json.dumps([base_seed, subject, reference_name, prompt, k], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def make_plan(
    subjects: Sequence[Subject],
    spec: PromptSpec,
    *,
    num_images: int,
    seed: int = 0,
    unique_token: str = "",
    classes: dict[str, str] | None = None,
    live_classes: Sequence[str] = DEFAULT_LIVE_CLASSES,
) -> list[PairItem]:
    """Every work item, in order (subject, reference, prompt)."""
    items = []
    for subject in subjects:
        class_name = (
            (classes or {}).get(subject.name) or spec.classes.get(subject.name) or class_from_name(subject.name)
        )
        templates = spec.templates(class_name, live_classes)
        for r, ref in enumerate(subject.references):
            for j, template in enumerate(templates):
                prompt = format_prompt(template, class_name, unique_token)
                stem = f"images/{subject.name}/{ref.stem}/{j:03d}"
                items.append(
                    PairItem(
                        index=len(items),
                        id=f"{subject.name}/{ref.stem}/{j:03d}",
                        subject=subject.name,
                        class_name=class_name,
                        reference=ref,
                        reference_index=r,
                        prompt_index=j,
                        prompt=prompt,
                        image_paths=tuple(f"{stem}_{k}.png" for k in range(num_images)),
                        seeds=tuple(image_seed(seed, subject.name, ref.name, prompt, k) for k in range(num_images)),
                    )
                )
    return items


def _record(item: PairItem, reference: str) -> ManifestRecord:
    return ManifestRecord(
        id=item.id,
        subject=item.subject,
        prompt=item.prompt,
        reference=reference,
        generated=[GeneratedImage(image=p, seed=s) for p, s in zip(item.image_paths, item.seeds, strict=True)],
        meta={"class": item.class_name, "reference_index": item.reference_index, "prompt_index": item.prompt_index},
    )


def _record_order(rec: ManifestRecord) -> tuple[Any, ...]:
    return (rec.subject, rec.meta.get("reference_index", 0), rec.meta.get("prompt_index", 0), rec.id)


# ----------------------------------------------------------------------------------------------------------------
# Sharding, settings, merging
# ----------------------------------------------------------------------------------------------------------------


def part_path(out_dir: str | os.PathLike[str], shard: tuple[int, int]) -> Path:
    """The manifest part of a shard: ``OUT/manifest.part-{i:05d}-of-{n:05d}.jsonl`` (next to the merged one)."""
    return Path(out_dir) / f"manifest.part-{shard[0]:05d}-of-{shard[1]:05d}.jsonl"


def _check_settings(out: Path, settings: dict[str, Any], num_items: int) -> None:
    path = out / SETTINGS_NAME
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        old = stored.get("settings", {})
        if old != settings:
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            diffs = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys)
            raise ValueError(
                f"{out} was built with other settings ({diffs}); resume with the same options or use another --out"
            )
        if stored.get("num_items") == num_items:
            return
    text = json.dumps({"settings": settings, "num_items": num_items}, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def merge_parts(out_dir: str | os.PathLike[str], *, allow_partial: bool = False) -> Manifest:
    """Merge ``OUT/manifest.part-*.jsonl`` into ``OUT/manifest.jsonl`` (ordered by subject, reference, prompt).

    Raises:
        FileNotFoundError: no parts. ValueError: fewer records than the plan has items (unless ``allow_partial``).
    """
    out = Path(out_dir)
    parts = sorted(out.glob("manifest.part-*.jsonl"))
    if not parts:
        raise FileNotFoundError(f"no manifest parts (manifest.part-*.jsonl) in {out}")
    settings_file = out / SETTINGS_NAME
    stored = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    first = Manifest.load(parts[0], check="none").header
    header = {k: v for k, v in first.items() if k not in ("shard", "complete")}
    merged = merge_manifests(parts, out / MANIFEST_NAME, header=header, sort_key=_record_order, save=False)
    expected = stored.get("num_items")
    if expected is not None and len(merged) < expected and not allow_partial:
        raise ValueError(
            f"{out}: the parts hold {len(merged)} of {expected} items; finish the remaining shards (rerun them to "
            "resume) or merge with --allow-partial"
        )
    merged.save()
    return merged


# ----------------------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    """What one ``build_pairs`` call did."""

    items_total: int
    shard: tuple[int, int]
    shard_items: int
    generated_items: int
    skipped_items: int
    part: Path
    complete: bool
    """All of this shard's items are done."""
    manifest: Path | None
    """The merged manifest, when every item of the plan is done."""


def _copy_reference(src: Path, out: Path, subject: str) -> str:
    dst = out / "references" / subject / src.name
    if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return f"references/{subject}/{src.name}"


def build_pairs(
    references: str | os.PathLike[str],
    prompts: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    pipe: Any,
    num_images: int = 2,
    resolution: int = 1024,
    steps: int = 30,
    guidance: float = 5.0,
    ip_scale: float = 0.6,
    negative_prompt: str = DEFAULT_NEGATIVE,
    seed: int = 0,
    batch_size: int = 1,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    max_references: int | None = None,
    unique_token: str = "",
    classes_file: str | os.PathLike[str] | None = None,
    live_classes: Sequence[str] = DEFAULT_LIVE_CLASSES,
    copy_references: bool = False,
    model_id: dict[str, Any] | None = None,
    progress: bool = True,
    flush_seconds: float = 30.0,
    generate_fn: Callable[..., Any] | None = None,
) -> BuildResult:
    """Generate this shard's missing images and write its manifest part (see the module docstring).

    Args:
        references: folder of reference images (subfolders per subject and/or flat).
        prompts: prompt list file (plain or DreamBench).
        out_dir: output folder.
        pipe: a pipeline from :func:`patchdpo_fast.generation.build_pipeline`.
        num_images: ``K``, images per (reference, prompt).
        resolution, steps, guidance, ip_scale, negative_prompt: generation settings.
        seed: base seed of the per-image seeds.
        batch_size: items per pipeline call (``batch_size * K`` images).
        shard: ``(i, n)``.
        limit: stop after generating this many items (the run is then incomplete; rerun to continue).
        max_references: use at most this many references per subject (sorted by name).
        unique_token, classes_file, live_classes: prompt filling, see :func:`read_prompt_file`.
        copy_references: copy references into ``OUT/references/`` (else the manifest points at the originals).
        model_id: identity of the generator, stored with the settings (e.g. ``generation.model_identity(args)``).
        progress: show a tqdm progress bar.
        flush_seconds: rewrite the manifest part at most this often while generating (and always at the end).
        generate_fn: replaces :func:`patchdpo_fast.generation.generate` (tests).

    Raises:
        ValueError: settings differ from those the output folder was built with, or bad inputs.
    """
    from tqdm.auto import tqdm

    from patchdpo_fast.generation import generate

    generate_fn = generate_fn or generate
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = read_prompt_file(prompts)
    classes = read_classes_file(classes_file) if classes_file else None
    plan = make_plan(
        discover_subjects(references, max_references),
        spec,
        num_images=num_images,
        seed=seed,
        unique_token=unique_token,
        classes=classes,
        live_classes=live_classes,
    )
    settings = {
        "format": 1,
        "model": model_id or {},
        "num_images": num_images,
        "resolution": resolution,
        "steps": steps,
        "guidance": guidance,
        "ip_scale": ip_scale,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "batch_size": batch_size,
        "unique_token": unique_token,
        "live_classes": sorted(live_classes),
        "copy_references": copy_references,
    }
    _check_settings(out, settings, len(plan))
    check_images([item.reference for item in plan], "reference image")  # before generating anything

    index, count = shard
    chunks = [plan[c : c + batch_size] for c in range(0, len(plan), batch_size)]
    mine = [chunk for c, chunk in enumerate(chunks) if c % count == index]
    my_items = [item for chunk in mine for item in chunk]

    def complete(item: PairItem) -> bool:
        return all((out / p).is_file() for p in item.image_paths)

    def reference_path(item: PairItem) -> str:
        if copy_references:
            return _copy_reference(item.reference, out, item.subject)
        return relative_path(item.reference, out)

    records: dict[str, ManifestRecord] = {}
    for item in my_items:
        if complete(item):
            records[item.id] = _record(item, reference_path(item))
    skipped = len(records)
    part = part_path(out, shard)
    header = {"created_by": "patchdpo_fast.data.build_pairs", "generation": settings}

    def flush(done: bool) -> None:
        ordered = [records[item.id] for item in my_items if item.id in records]
        Manifest(part, ordered, {**header, "shard": [index, count], "complete": done}).save()

    generated = 0
    last_flush = time.monotonic()
    bar = tqdm(
        total=len(my_items),
        initial=skipped,
        desc=f"build-pairs {index}/{count}",
        unit="item",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    stopped = False
    try:
        for chunk in mine:
            todo = [item for item in chunk if item.id not in records]
            if not todo:
                continue
            if limit is not None and generated >= limit:
                stopped = True
                break
            images = generate_fn(
                pipe,
                [item.reference for item in chunk],
                [item.prompt for item in chunk],
                ip_scale=ip_scale,
                steps=steps,
                guidance=guidance,
                seed=[s for item in chunk for s in item.seeds],
                resolution=resolution,
                num_images_per_prompt=num_images,
                negative_prompt=negative_prompt,
                output_type="pil",
            )
            for i, item in enumerate(chunk):
                if item.id in records:
                    continue
                for k, rel in enumerate(item.image_paths):
                    if not (out / rel).is_file():
                        save_image_atomic(images[i * num_images + k], out / rel)
                records[item.id] = _record(item, reference_path(item))
                generated += 1
                bar.update(1)
            if time.monotonic() - last_flush >= flush_seconds:
                flush(False)
                last_flush = time.monotonic()
    finally:
        bar.close()
        flush(len(records) == len(my_items))
    shard_complete = len(records) == len(my_items)
    if stopped:
        logger.info("stopped after --limit %d items; rerun to continue", limit)

    manifest = None
    if shard_complete and all(complete(item) for item in plan):
        try:
            manifest = merge_parts(out).path
        except ValueError as exc:  # another shard has not flushed its part yet
            logger.info("not merging yet: %s", exc)
    return BuildResult(
        items_total=len(plan),
        shard=shard,
        shard_items=len(my_items),
        generated_items=generated,
        skipped_items=skipped,
        part=part,
        complete=shard_complete,
        manifest=manifest,
    )


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``patchdpo build-pairs``: generate training pairs with the pre-trained IP-Adapter-Plus into a manifest."""
    from patchdpo_fast.generation import add_model_arguments, build_pipeline, model_identity, models_from_args

    parser = argparse.ArgumentParser(
        prog="patchdpo build-pairs",
        description="Generate K images per (reference, prompt) with the pre-trained personalized model and write "
        "images + a manifest. Resumable (rerun the same command), shardable (--shard i/n or RANK/WORLD_SIZE).",
    )
    parser.add_argument(
        "--references", type=Path, help="folder of reference images (one subfolder per subject, or flat)"
    )
    parser.add_argument("--prompts", type=Path, help="prompt list (one per line, {} = class) or DreamBench's "
                        "prompts_and_classes.txt")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (images/, manifest parts, manifest.jsonl)"
    )
    parser.add_argument("--num-images", "-k", type=int, default=2, help="images per (reference, prompt) (default 2)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--ip-scale", type=float, default=0.6, help="image-prompt scale (default 0.6)")
    parser.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE, help="negative prompt (default: IP-Adapter's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-image seeds (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="items per pipeline call (default 1)")
    parser.add_argument("--max-references", type=int, default=None, help="references per subject (default all)")
    parser.add_argument("--unique-token", default="", help="text for {0}/{token} in prompts (default empty)")
    parser.add_argument("--classes", type=Path, help="subject,class lines (overrides the prompt file's table)")
    parser.add_argument("--live-classes", default=",".join(DEFAULT_LIVE_CLASSES),
                        help="classes that get DreamBench's live-subject prompts (default dog,cat)")  # fmt: skip
    parser.add_argument("--copy-references", action="store_true", help="copy references into OUT/references/")
    parser.add_argument("--shard", default=None, help="this process's shard 'i/n' (default RANK/WORLD_SIZE, or 0/1)")
    parser.add_argument("--limit", type=int, default=None, help="stop after generating this many items")
    parser.add_argument("--flush-seconds", type=float, default=30.0, help="manifest part rewrite interval (30 s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--merge", action="store_true", help="only merge OUT/manifest.part-*.jsonl into OUT/manifest.jsonl"
    )
    parser.add_argument("--allow-partial", action="store_true", help="with --merge: merge even if items are missing")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.merge:
        merged = merge_parts(args.out, allow_partial=args.allow_partial)
        print(f"merged {len(merged)} records ({merged.num_pairs} pairs): {merged.path}")
        return 0
    if args.references is None or args.prompts is None:
        parser.error("--references and --prompts are required (unless --merge)")
    shard = parse_shard(args.shard)
    # inputs are checked before the models load and anything is generated
    read_prompt_file(args.prompts)
    references = [p for s in discover_subjects(args.references, args.max_references) for p in s.references]
    check_images(references, "reference image")
    models = models_from_args(args)
    pipe = build_pipeline(models, scheduler=args.scheduler)
    result = build_pairs(
        args.references,
        args.prompts,
        args.out,
        pipe=pipe,
        num_images=args.num_images,
        resolution=args.resolution or (64 if args.tiny else 1024),
        steps=args.steps,
        guidance=args.guidance,
        ip_scale=args.ip_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        shard=shard,
        limit=args.limit,
        max_references=args.max_references,
        unique_token=args.unique_token,
        classes_file=args.classes,
        live_classes=[c.strip() for c in args.live_classes.split(",") if c.strip()],
        copy_references=args.copy_references,
        model_id=model_identity(args),
        progress=not args.no_progress,
        flush_seconds=args.flush_seconds,
    )
    state = "complete" if result.complete else "incomplete (rerun to continue)"
    print(
        f"shard {result.shard[0]}/{result.shard[1]}: {result.generated_items} items generated, "
        f"{result.skipped_items} already done, {result.shard_items} in this shard ({state}); part: {result.part}"
    )
    if result.manifest is not None:
        print(f"manifest: {result.manifest}")
    elif result.complete:
        print("other shards are not finished; the last one merges (or run with --merge)")
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("build-pairs", main))
