"""The DreamBench protocol: subjects, classes, prompts, the output layout and its checker.

DreamBench (the DreamBooth dataset) has 30 subjects, each with a class word (``dog``, ``backpack``, ``stuffed
animal``, ...) and 3-6 photos. Its ``prompts_and_classes.txt`` holds the class table and two lists of 25 prompt
templates, one for objects and one for live subjects; the live subjects are the cats and dogs
(:data:`LIVE_CLASSES`). A template reads ``'a {0} {1} in the jungle'.format(unique_token, class_token)``.

Finetuning-free methods (IP-Adapter-Plus, PatchDPO) have no unique token: the prompt is the template with ``{0}``
removed and ``{1}`` replaced by the class word, e.g. ``a backpack in the jungle`` (:func:`render_prompt`). That
prompt is generated and is also the text of the CLIP-T score.

Output layout (what the official PatchDPO evaluation reads)::

    <out>/<subject>/<slug>.png        one image per (subject, prompt)

where ``slug = prompt_slug(prompt)``. For every DreamBench prompt the slug *is* the prompt (letters and spaces
only), so the file stem equals the prompt text, as in the official layout. Other files (hidden temporary files,
``<out>/_contact_sheets/``, run records) are ignored by the checker.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from patchdpo_fast.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "KOSMOS_G_REFERENCE",
    "LIVE_CLASSES",
    "PAPER_RESULTS",
    "PROMPTS_FILE_NAME",
    "RUN_RECORD_NAME",
    "DreamBenchItem",
    "DreamBenchProtocol",
    "DreamBenchSubject",
    "LayoutError",
    "LayoutReport",
    "UnknownSubjectError",
    "check_layout",
    "find_prompts_file",
    "image_path",
    "parse_prompts_file",
    "parse_subject_list",
    "prompt_slug",
    "read_run_record",
    "reference_images",
    "render_prompt",
    "selected_reference",
]

#: Name of the protocol file in the DreamBooth dataset folder.
PROMPTS_FILE_NAME = "prompts_and_classes.txt"

#: The record ``patchdpo generate`` writes at the root of its output folder (settings, model, selection).
RUN_RECORD_NAME = "dreambench_run.json"

#: Classes whose subjects get the live-subject prompt list (the cats and dogs of DreamBench).
LIVE_CLASSES: tuple[str, ...] = ("cat", "dog")

#: File suffixes read as reference images.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

#: The one reference photo per subject of the Kosmos-G setting ("single"), as selected by Kosmos-G.
KOSMOS_G_REFERENCE: dict[str, str] = {
    "backpack": "02",
    "backpack_dog": "02",
    "bear_plushie": "03",
    "berry_bowl": "02",
    "can": "01",
    "candle": "02",
    "cat": "04",
    "cat2": "02",
    "clock": "03",
    "colorful_sneaker": "01",
    "dog": "02",
    "dog2": "02",
    "dog3": "05",
    "dog5": "00",
    "dog6": "02",
    "dog7": "01",
    "dog8": "04",
    "duck_toy": "01",
    "fancy_boot": "02",
    "grey_sloth_plushie": "04",
    "monster_toy": "04",
    "pink_sunglasses": "04",
    "poop_emoji": "00",
    "rc_car": "03",
    "red_cartoon": "00",
    "robot_toy": "00",
    "shiny_sneaker": "01",
    "teapot": "04",
    "vase": "02",
    "wolf_plushie": "04",
}

#: Published DreamBench numbers (PatchDPO paper, arXiv 2412.03177): setting -> [(method, DINO, CLIP-I, CLIP-T)].
PAPER_RESULTS: dict[str, list[tuple[str, float, float, float]]] = {
    "all": [("IP-Adapter-Plus", 0.692, 0.826, 0.281), ("PatchDPO", 0.727, 0.838, 0.292)],
    "single": [("PatchDPO", 0.831, 0.880, 0.288)],
}

_TEMPLATE_LINE = re.compile(r"""^\s*(['"])(?P<template>.*?)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")
_SLUG_ALLOWED = re.compile(r"[^A-Za-z0-9 ,.'_-]")


# ----------------------------------------------------------------------------------------------------------------
# Prompts and file names
# ----------------------------------------------------------------------------------------------------------------


def render_prompt(template: str, class_name: str, unique_token: str = "") -> str:
    """``template.format(unique_token, class_name)`` with whitespace runs collapsed (no token -> no double space)."""
    return " ".join(template.format(unique_token, class_name).split())


def prompt_slug(prompt: str) -> str:
    """The file stem of a prompt's image.

    Exactly: NFKC-normalize; replace every character other than ASCII letters, digits, space, ``,``, ``.``,
    ``'``, ``_`` and ``-`` by ``_``; collapse whitespace runs to one space; strip spaces and dots at both ends (no
    hidden or ``..`` names); cut to 200 characters (then strip again). DreamBench prompts are unchanged by this,
    so ``<slug>.png`` is ``<prompt>.png`` there.

    Raises:
        ValueError: the slug would be empty.
    """
    text = unicodedata.normalize("NFKC", prompt)
    text = " ".join(_SLUG_ALLOWED.sub("_", text).split())
    text = text.strip(" .")[:200].strip(" .")
    if not text:
        raise ValueError(f"prompt {prompt!r} gives an empty file name")
    return text


def image_path(out_dir: str | os.PathLike[str], subject: str, prompt: str) -> Path:
    """``<out_dir>/<subject>/<prompt_slug(prompt)>.png``."""
    return Path(out_dir) / subject / f"{prompt_slug(prompt)}.png"


# ----------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamBenchSubject:
    """One subject: its folder name, class word and whether it is a live subject (cat/dog)."""

    name: str
    class_name: str
    live: bool


@dataclass(frozen=True)
class DreamBenchItem:
    """One image of the protocol: subject, prompt index in its list, prompt text and file name."""

    subject: str
    class_name: str
    live: bool
    index: int
    prompt: str

    @property
    def file_name(self) -> str:
        """``<prompt_slug(prompt)>.png``."""
        return f"{prompt_slug(self.prompt)}.png"


@dataclass(frozen=True)
class DreamBenchProtocol:
    """Subjects (in file order) and the object / live-subject prompt templates."""

    subjects: tuple[DreamBenchSubject, ...]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]
    source: str | None = None

    @property
    def subject_names(self) -> list[str]:
        """Subject names in protocol order."""
        return [s.name for s in self.subjects]

    def subject(self, name: str) -> DreamBenchSubject:
        """The subject called ``name``.

        Raises:
            KeyError: unknown subject (the message lists the known ones).
        """
        for s in self.subjects:
            if s.name == name:
                return s
        raise UnknownSubjectError(f"unknown DreamBench subject {name!r}; known: {', '.join(self.subject_names)}")

    def templates(self, subject: str) -> tuple[str, ...]:
        """The prompt templates of ``subject`` (live-subject list for cats and dogs)."""
        return self.live_templates if self.subject(subject).live else self.object_templates

    def prompts(self, subject: str, unique_token: str = "", limit: int | None = None) -> list[str]:
        """The subject's prompts (first ``limit`` of them), see :func:`render_prompt`."""
        s = self.subject(subject)
        templates = self.templates(subject)
        if limit is not None:
            templates = templates[: max(0, limit)]
        return [render_prompt(t, s.class_name, unique_token) for t in templates]

    def items(
        self, subjects: Sequence[str] | None = None, prompts_limit: int | None = None, unique_token: str = ""
    ) -> list[DreamBenchItem]:
        """Every (subject, prompt) of the selection, subjects in protocol order, prompts in list order."""
        chosen = self.select_subjects(subjects)
        out = []
        for s in chosen:
            for j, prompt in enumerate(self.prompts(s.name, unique_token, prompts_limit)):
                out.append(DreamBenchItem(s.name, s.class_name, s.live, j, prompt))
        return out

    def select_subjects(self, subjects: Sequence[str] | None = None) -> list[DreamBenchSubject]:
        """The named subjects in protocol order (all when ``None``).

        Raises:
            KeyError: unknown subject names (all listed).
        """
        if subjects is None:
            return list(self.subjects)
        wanted = list(dict.fromkeys(subjects))
        unknown = [n for n in wanted if n not in self.subject_names]
        if unknown:
            raise UnknownSubjectError(
                f"unknown DreamBench subjects: {', '.join(unknown)}; known: {', '.join(self.subject_names)}"
            )
        return [s for s in self.subjects if s.name in wanted]


def parse_prompts_file(path: str | os.PathLike[str], live_classes: Iterable[str] = LIVE_CLASSES) -> DreamBenchProtocol:
    """Read DreamBench's ``prompts_and_classes.txt``.

    The file has a ``Classes`` section (``subject_name,class`` header, then one ``subject,class`` line per subject)
    and a ``Prompts`` section with an ``Object Prompts`` and a ``Live Subject Prompts`` list, each entry a line
    ``'<template>'.format(unique_token, class_token),``. Subjects whose class is in ``live_classes`` are live.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a section is missing or empty, a template lacks ``{1}``, or a subject is listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DreamBench prompts file not found: {path}")
    live = {c.strip() for c in live_classes}
    classes: list[tuple[str, str]] = []
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section: str | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        lower = line.lower()
        if not line:
            continue
        if lower == "classes":
            section = "classes"
        elif lower == "prompts":
            section = "prompts"
        elif lower == "object prompts":
            section = "object"
        elif lower == "live subject prompts":
            section = "live"
        elif section == "classes" and "," in line and lower != "subject_name,class":
            name, cls = (part.strip() for part in line.split(",", 1))
            if name and cls:
                classes.append((name, cls))
        elif section in lists:
            match = _TEMPLATE_LINE.match(line)
            if match:
                lists[section].append(match.group("template"))
    if not classes:
        raise ValueError(f"{path}: no 'Classes' table (subject_name,class lines)")
    for key, title in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if not lists[key]:
            raise ValueError(f"{path}: no '{title}' list")
        bad = [t for t in lists[key] if "{1}" not in t]
        if bad:
            raise ValueError(f"{path}: templates without the class placeholder {{1}}: {bad}")
    names = [n for n, _ in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: subjects listed twice: {', '.join(duplicates)}")
    subjects = tuple(DreamBenchSubject(n, c, c in live) for n, c in classes)
    return DreamBenchProtocol(subjects, tuple(lists["object"]), tuple(lists["live"]), source=str(path))


def find_prompts_file(
    references_dir: str | os.PathLike[str], prompts_file: str | os.PathLike[str] | None = None
) -> Path:
    """``prompts_file`` if given, else ``prompts_and_classes.txt`` in ``references_dir`` or its parent.

    Raises:
        FileNotFoundError: none found (the message names the places looked at).
    """
    if prompts_file is not None:
        p = Path(prompts_file)
        if not p.is_file():
            raise FileNotFoundError(f"DreamBench prompts file not found: {p}")
        return p
    root = Path(references_dir)
    candidates = [root / PROMPTS_FILE_NAME, root.parent / PROMPTS_FILE_NAME]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no {PROMPTS_FILE_NAME} in {candidates[0].parent} or {candidates[1].parent}; pass --prompts-file"
    )


def parse_subject_list(values: Sequence[str] | str | None) -> list[str] | None:
    """Subject names from comma- and/or space-separated strings (``None`` stays ``None``: all subjects)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    names = [n for v in values for n in re.split(r"[,\s]+", v) if n]
    return list(dict.fromkeys(names)) or None


# ----------------------------------------------------------------------------------------------------------------
# Reference images
# ----------------------------------------------------------------------------------------------------------------


def reference_images(references_dir: str | os.PathLike[str], subject: str) -> list[Path]:
    """All reference photos of a subject: the image files of ``<references_dir>/<subject>/``, sorted by name.

    Raises:
        FileNotFoundError: the folder is missing or holds no image.
    """
    folder = Path(references_dir) / subject
    if not folder.is_dir():
        raise FileNotFoundError(f"no reference folder for subject {subject!r}: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise FileNotFoundError(f"no reference images in {folder}")
    return files


def selected_reference(
    references_dir: str | os.PathLike[str], subject: str, selection: dict[str, str] | None = None
) -> Path:
    """The one reference photo of the Kosmos-G setting: ``<subject>/<KOSMOS_G_REFERENCE[subject]>.<ext>``.

    Raises:
        KeyError: the subject has no selected photo in ``selection``.
        FileNotFoundError: the selected photo is not in the folder.
    """
    selection = KOSMOS_G_REFERENCE if selection is None else selection
    if subject not in selection:
        raise UnknownSubjectError(f"no selected reference image for subject {subject!r}")
    stem = selection[subject]
    for p in reference_images(references_dir, subject):
        if p.stem == stem:
            return p
    raise FileNotFoundError(f"selected reference {stem!r} of subject {subject!r} not found in {Path(references_dir)}")


# ----------------------------------------------------------------------------------------------------------------
# Layout checker
# ----------------------------------------------------------------------------------------------------------------


class UnknownSubjectError(UserError, KeyError):
    """A subject name that the protocol (or the single-reference selection) does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown subject"


class LayoutError(ValueError):
    """Generated images are missing; ``missing_subjects`` and ``missing_images`` list them."""

    def __init__(self, message: str, missing_subjects: list[str], missing_images: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.missing_subjects = missing_subjects
        self.missing_images = missing_images


@dataclass
class LayoutReport:
    """Result of :func:`check_layout`: the expected items with their paths, and what else was found."""

    root: Path
    items: list[DreamBenchItem]
    paths: list[Path]
    missing_subjects: list[str] = field(default_factory=list)
    missing_images: list[tuple[str, str]] = field(default_factory=list)
    unexpected_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every expected image exists."""
        return not self.missing_subjects and not self.missing_images

    def by_subject(self) -> dict[str, list[tuple[DreamBenchItem, Path]]]:
        """Expected (item, path) pairs grouped by subject, in protocol order."""
        out: dict[str, list[tuple[DreamBenchItem, Path]]] = {}
        for item, path in zip(self.items, self.paths, strict=True):
            out.setdefault(item.subject, []).append((item, path))
        return out

    def message(self) -> str:
        """A readable list of what is missing (empty when ``ok``)."""
        if self.ok:
            return ""
        n_sub = len({i.subject for i in self.items})
        lines = [
            f"DreamBench layout check failed for {self.root}: expected {len(self.items)} images "
            f"({n_sub} subjects) as <subject>/<prompt>.png"
        ]
        if self.missing_subjects:
            lines.append(f"missing subjects ({len(self.missing_subjects)}): {', '.join(self.missing_subjects)}")
        if self.missing_images:
            lines.append(f"missing images ({len(self.missing_images)}):")
            grouped: dict[str, list[str]] = {}
            for subject, name in self.missing_images:
                grouped.setdefault(subject, []).append(name)
            for subject, names in grouped.items():
                lines.append(f"  {subject}/: " + ", ".join(repr(n) for n in names))
        return "\n".join(lines)


def check_layout(
    generated_dir: str | os.PathLike[str],
    protocol: DreamBenchProtocol,
    subjects: Sequence[str] | None = None,
    prompts_limit: int | None = None,
    *,
    raise_on_missing: bool = True,
) -> LayoutReport:
    """Check that ``<generated_dir>/<subject>/<slug>.png`` exists for every selected (subject, prompt).

    A subject whose folder is absent is reported as a missing subject (its images are not listed one by one);
    in present folders each missing prompt image is listed. Image files in a subject folder that belong to no
    selected prompt are reported in ``unexpected_files`` (not an error; hidden files are ignored).

    Raises:
        LayoutError: something is missing and ``raise_on_missing`` (the message lists it all).
    """
    root = Path(generated_dir)
    items = protocol.items(subjects, prompts_limit)
    report = LayoutReport(root, items, [root / i.subject / i.file_name for i in items])
    expected_names: dict[str, set[str]] = {}
    for item in items:
        expected_names.setdefault(item.subject, set()).add(item.file_name)
    for subject, names in expected_names.items():
        folder = root / subject
        if not folder.is_dir():
            report.missing_subjects.append(subject)
            continue
        present = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
        for item in (i for i in items if i.subject == subject):
            if item.file_name not in present:
                report.missing_images.append((subject, item.file_name))
        report.unexpected_files += sorted(
            f"{subject}/{n}" for n in present - names if Path(n).suffix.lower() in IMAGE_SUFFIXES
        )
    if raise_on_missing and not report.ok:
        raise LayoutError(report.message(), report.missing_subjects, report.missing_images)
    return report


def read_run_record(generated_dir: str | os.PathLike[str]) -> dict | None:
    """The ``dreambench_run.json`` that ``patchdpo generate`` wrote in ``generated_dir`` (``None`` if absent)."""
    import json

    path = Path(generated_dir) / RUN_RECORD_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
