"""``patchdpo import-official``: turn the official PatchDPO data layout into a manifest.

The official training data is a folder of ``sample{i}/`` subfolders, each holding a reference image
``{prompt}_entity_0.png`` and generated images ``{prompt}_gen_{k}.png`` (the prompt is the file name's prefix).
Every (folder, prompt) becomes one record: id ``sample{i}/{prompt}``, subject ``sample{i}`` (the official data names
no subjects), the reference and the generated images sorted by ``k``. Quality maps are not imported (the official
region maps are a pickle, which this library never loads): compute them with ``patchdpo quality``.

Images are referenced where they are (paths relative to the manifest) or, with ``--copy``, copied next to it.
Folders or prompts without a reference or without generated images, and unreadable images, are reported; they are
skipped (default) or make the import fail (``--on-bad-record error``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from patchdpo_fast.data.files import IMAGE_SUFFIXES
from patchdpo_fast.data.manifest import (
    GeneratedImage,
    Manifest,
    ManifestError,
    ManifestProblem,
    ManifestRecord,
    relative_path,
)

__all__ = ["import_official", "main", "scan_official"]

logger = logging.getLogger(__name__)

_SUFFIX = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
_REFERENCE = re.compile(rf"^(?P<prompt>.+)_entity_0\.(?:{_SUFFIX})$", re.IGNORECASE)
_GENERATED = re.compile(rf"^(?P<prompt>.+)_gen_(?P<k>\d+)\.(?:{_SUFFIX})$", re.IGNORECASE)


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def scan_official(
    root: str | os.PathLike[str], max_generated: int | None = None
) -> tuple[list[tuple[str, str, Path, list[Path]]], list[ManifestProblem]]:
    """Find ``(folder, prompt, reference, generated)`` groups under ``root`` and the problems met on the way.

    Folders are visited in natural order (``sample2`` before ``sample10``), prompts alphabetically, generated images
    by ``k``. ``max_generated`` keeps the first ``k`` images of each group.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"official data folder not found: {base}")
    groups: list[tuple[str, str, Path, list[Path]]] = []
    problems: list[ManifestProblem] = []
    folders = sorted(
        (p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural_key(p.name)
    )
    for folder in folders:
        refs: dict[str, Path] = {}
        gens: dict[str, list[tuple[int, Path]]] = {}
        for file in sorted(folder.iterdir()):
            if not file.is_file() or file.name.startswith("."):
                continue
            if match := _REFERENCE.match(file.name):
                refs[match.group("prompt")] = file
            elif match := _GENERATED.match(file.name):
                gens.setdefault(match.group("prompt"), []).append((int(match.group("k")), file))
        if not refs and not gens:
            problems.append(ManifestProblem(None, folder.name, "no *_entity_0 / *_gen_{k} images"))
            continue
        for prompt in sorted(set(refs) | set(gens)):
            rid = f"{folder.name}/{prompt}"
            if prompt not in refs:
                problems.append(ManifestProblem(None, rid, f"no reference image {prompt}_entity_0.png in {folder}"))
                continue
            if prompt not in gens:
                problems.append(ManifestProblem(None, rid, f"no generated image {prompt}_gen_<k>.png in {folder}"))
                continue
            ordered = [path for _, path in sorted(gens[prompt])]
            groups.append((folder.name, prompt, refs[prompt], ordered[:max_generated] if max_generated else ordered))
    return groups, problems


def import_official(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    copy: bool = False,
    max_generated: int | None = None,
    on_bad_record: str = "skip",
    check: str = "quick",
) -> Manifest:
    """Write a manifest for the official layout under ``root``.

    Args:
        root: the folder holding ``sample{i}/``.
        out: the manifest file (``.jsonl``) or a folder (the manifest is then ``out/manifest.jsonl``).
        copy: copy the images to ``<manifest folder>/images/<sample>/`` instead of referencing them in place.
        max_generated: keep at most this many generated images per group.
        on_bad_record: ``"skip"`` leaves bad groups out (listed on ``manifest.report`` and in the log); ``"error"``
            raises :class:`ManifestError` listing all of them before anything is written.
        check: file check of the imported records (``"none"``, ``"quick"``, ``"full"``, see :meth:`Manifest.load`).

    Returns:
        The written manifest.
    """
    if on_bad_record not in ("skip", "error"):
        raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
    out_path = Path(out)
    if out_path.suffix != ".jsonl":
        out_path = out_path / "manifest.jsonl"
    groups, problems = scan_official(root, max_generated)
    manifest_dir = out_path.parent

    records = []
    for folder, prompt, reference, generated in groups:
        if copy:
            paths = [f"images/{folder}/{p.name}" for p in [reference, *generated]]
        else:
            paths = [relative_path(p, manifest_dir) for p in [reference, *generated]]
        records.append(
            ManifestRecord(
                id=f"{folder}/{prompt}",
                subject=folder,
                prompt=prompt,
                reference=paths[0],
                generated=[GeneratedImage(image=p) for p in paths[1:]],
                meta={"source": "official"},
            )
        )
    sources = {f"{folder}/{prompt}": [ref, *gens] for folder, prompt, ref, gens in groups}
    if not copy:  # validate the files in place before writing
        probe = Manifest(out_path, records)
        report = probe.validate(check)
        problems += report.problems
        bad = {p.record_id for p in report.problems}
        records = [r for r in records if r.id not in bad]
    if problems and on_bad_record == "error":
        raise ManifestError(f"{len(problems)} problem(s) in the official layout under {root}", out_path, problems)
    if copy:
        for rec in records:
            for src, rel in zip(sources[rec.id], [rec.reference, *(g.image for g in rec.generated)], strict=True):
                dst = manifest_dir / rel
                if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dst)
        probe = Manifest(out_path, records)
        report = probe.validate(check)
        if report.problems:
            problems += report.problems
            if on_bad_record == "error":
                raise ManifestError(f"{len(report.problems)} unreadable image(s)", out_path, report.problems)
            bad = {p.record_id for p in report.problems}
            records = [r for r in records if r.id not in bad]
    if not records:
        raise ManifestError(f"no usable (reference, generated) groups under {root}", out_path, problems)
    manifest = Manifest(out_path, records, {"created_by": "patchdpo_fast.data.import_official",
                                            "source": {"official_layout": str(root)}})  # fmt: skip
    manifest.save()
    manifest.report.problems = problems
    if problems:
        logger.warning("import-official: skipped %d problem group(s)", len(problems))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``patchdpo import-official``: write a manifest for the official PatchDPO data layout."""
    parser = argparse.ArgumentParser(
        prog="patchdpo import-official",
        description="Import the official PatchDPO layout (sample{i}/{prompt}_entity_0.png = reference, "
        "{prompt}_gen_{k}.png = generated) into a patchdpo manifest.",
    )
    parser.add_argument("root", type=Path, help="folder holding the sample{i}/ subfolders")
    parser.add_argument("--out", type=Path, required=True, help="manifest file (.jsonl) or folder for manifest.jsonl")
    parser.add_argument("--copy", action="store_true", help="copy the images next to the manifest")
    parser.add_argument("--max-generated", type=int, default=None, help="generated images per group (default all)")
    parser.add_argument("--on-bad-record", choices=("skip", "error"), default="skip",
                        help="skip (default) or fail on groups without reference/generated images")  # fmt: skip
    parser.add_argument("--check", choices=("none", "quick", "full"), default="quick", help="image check level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = import_official(
        args.root,
        args.out,
        copy=args.copy,
        max_generated=args.max_generated,
        on_bad_record=args.on_bad_record,
        check=args.check,
    )
    for problem in manifest.report.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"imported {len(manifest)} records ({manifest.num_pairs} pairs): {manifest.path}")
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("import-official", main))
