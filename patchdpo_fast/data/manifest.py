"""The PatchDPO dataset manifest: a versioned, validated JSONL file of (reference, generated images, maps) groups.

Format (version 1, specified in ``docs/data.md``)::

    {"format": "patchdpo-manifest", "version": 1, "map_size": [8, 8], ...}          <- line 1: the header
    {"id": "dog/00/000", "subject": "dog", "prompt": "a dog on the beach",
     "reference": "refs/dog/00.jpg",
     "generated": [{"image": "images/dog/00/000_0.png", "seed": 17,
                    "q_ref": "maps/dog/00/000_0.q_ref.safetensors",
                    "q_gen": "maps/dog/00/000_0.q_gen.safetensors"},
                   {"image": "images/dog/00/000_1.png", "seed": 18}]}            <- one line per record

Paths are relative to the manifest's folder (absolute paths are accepted). Quality maps are optional until
computed; ``q_ref`` (reference side) and ``q_gen`` (generated side) come together. Every record expands to one
training pair per generated image: ``(reference, generated[k])``.

A record may instead be a plain preference pair (Pick-a-Pic-like, for training the UNet or a LoRA on it without an
IP-Adapter): ``{"id": "pap/0001", "prompt": "a red fox", "winner": "w.jpg", "loser": "l.jpg"}`` (``subject`` and
``meta`` optional; ``loser`` may also be an object like a ``generated`` entry, with its maps). It is one pair whose
winner takes the reference side and whose loser the generated side; it has no reference photo to condition an
IP-Adapter on (:attr:`ManifestPair.preference`).

:meth:`Manifest.load` validates every line and collects *every* problem with its line number: bad JSON, a missing
or mistyped field, a duplicate id, a missing file, an unreadable image, an unreadable or wrong-size quality map.
With ``on_bad_record="error"`` it raises one :class:`ManifestError` listing them all; with ``"skip"`` it drops the
bad records, keeps the :class:`ValidationReport` on ``manifest.report`` and fails only past ``max_bad_records``.

Writes are atomic (temporary file in the same folder + ``os.replace``): a reader never sees half a manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from patchdpo_fast.data.files import atomic_write_bytes, probe_image, probe_quality_map

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "GeneratedImage",
    "Manifest",
    "ManifestError",
    "ManifestPair",
    "ManifestProblem",
    "ManifestRecord",
    "ValidationReport",
    "is_manifest_file",
    "merge_manifests",
    "relative_path",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "patchdpo-manifest"
MANIFEST_VERSION = 1

CheckLevel = Literal["none", "quick", "full"]
BadRecordPolicy = Literal["error", "skip"]

_RECORD_FIELDS = ("id", "subject", "prompt", "reference", "generated", "meta")
_REQUIRED_FIELDS = ("id", "subject", "prompt", "reference", "generated")
_PREFERENCE_FIELDS = ("id", "subject", "prompt", "winner", "loser", "meta")
_PREFERENCE_REQUIRED = ("id", "prompt", "winner", "loser")
_GENERATED_FIELDS = ("image", "q_ref", "q_gen", "seed", "meta")
_MESSAGE_LIMIT = 200  # problems spelled out in an exception message (all of them stay on .problems)


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------


class _FieldError(ValueError):
    """A schema problem inside one record."""


@dataclass
class GeneratedImage:
    """One generated image of a record and, once computed, its pair's quality maps (paths as written)."""

    image: str
    q_ref: str | None = None
    q_gen: str | None = None
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_maps(self) -> bool:
        """Whether both quality maps are recorded."""
        return self.q_ref is not None and self.q_gen is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.q_ref is not None:
            out["q_ref"] = self.q_ref
        if self.q_gen is not None:
            out["q_gen"] = self.q_gen
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, value: Any, where: str) -> GeneratedImage:
        if isinstance(value, str):  # shorthand: a bare image path
            value = {"image": value}
        if not isinstance(value, dict):
            raise _FieldError(f"{where} must be an object or an image path, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_GENERATED_FIELDS))
        if unknown:
            raise _FieldError(f"{where} has unknown field(s) {unknown} (allowed: {list(_GENERATED_FIELDS)})")
        if "image" not in value:
            raise _FieldError(f"{where} is missing field 'image'")
        for key in ("image", "q_ref", "q_gen"):
            if key in value and value[key] is not None and (not isinstance(value[key], str) or not value[key]):
                raise _FieldError(f"{where}.{key} must be a non-empty path string, got {value[key]!r}")
        if (value.get("q_ref") is None) != (value.get("q_gen") is None):
            raise _FieldError(f"{where}: q_ref and q_gen must be given together (or both left out)")
        seed = value.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _FieldError(f"{where}.seed must be an integer, got {seed!r}")
        meta = value.get("meta", {})
        if not isinstance(meta, dict):
            raise _FieldError(f"{where}.meta must be an object, got {type(meta).__name__}")
        return cls(value["image"], value.get("q_ref"), value.get("q_gen"), seed, meta)


@dataclass
class ManifestRecord:
    """One pair group: a subject's reference image, a prompt and the images generated from them.

    ``line`` is the 1-based line number the record was read from (None for records built in memory). A preference
    record (``kind="preference"``, written as ``winner`` / ``loser``) keeps its winner in ``reference`` and its loser
    as the only ``generated`` image.
    """

    id: str
    subject: str
    prompt: str
    reference: str
    generated: list[GeneratedImage]
    meta: dict[str, Any] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)
    kind: Literal["reference", "preference"] = "reference"

    @classmethod
    def preference(
        cls, id: str, prompt: str, winner: str, loser: str, subject: str = "", meta: dict[str, Any] | None = None
    ) -> ManifestRecord:
        """A plain preference pair: ``prompt``, the preferred image ``winner`` and the other one ``loser``."""
        return cls(id, subject, prompt, winner, [GeneratedImage(loser)], dict(meta or {}), None, "preference")

    def to_json(self) -> dict[str, Any]:
        if self.kind == "preference":
            loser = self.generated[0].to_json()
            pref: dict[str, Any] = {"id": self.id}
            if self.subject:
                pref["subject"] = self.subject
            pref.update(prompt=self.prompt, winner=self.reference, loser=loser if len(loser) > 1 else loser["image"])
            if self.meta:
                pref["meta"] = self.meta
            return pref
        out: dict[str, Any] = {
            "id": self.id,
            "subject": self.subject,
            "prompt": self.prompt,
            "reference": self.reference,
            "generated": [g.to_json() for g in self.generated],
        }
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_line(self) -> str:
        """The record as one JSONL line (with its newline)."""
        return json.dumps(self.to_json(), ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, value: Any, line: int | None = None) -> ManifestRecord:
        """Parse and schema-check one record object.

        Raises:
            ValueError: the first schema problem (missing / unknown / mistyped field).
        """
        if not isinstance(value, dict):
            raise _FieldError(f"a record must be a JSON object, got {type(value).__name__}")
        if "winner" in value or "loser" in value:
            return cls._preference_from_json(value, line)
        missing = [k for k in _REQUIRED_FIELDS if k not in value]
        if missing:
            raise _FieldError(f"missing field(s) {missing}")
        unknown = sorted(set(value) - set(_RECORD_FIELDS))
        if unknown:
            raise _FieldError(f"unknown field(s) {unknown} (allowed: {list(_RECORD_FIELDS)})")
        for key in ("id", "subject", "reference"):
            if not isinstance(value[key], str) or not value[key]:
                raise _FieldError(f"field '{key}' must be a non-empty string, got {value[key]!r}")
        if not isinstance(value["prompt"], str):
            raise _FieldError(f"field 'prompt' must be a string, got {value['prompt']!r}")
        gens = value["generated"]
        if not isinstance(gens, list) or not gens:
            raise _FieldError(f"field 'generated' must be a non-empty list, got {gens!r}")
        generated = [GeneratedImage.from_json(g, f"generated[{k}]") for k, g in enumerate(gens)]
        meta = value.get("meta", {})
        if not isinstance(meta, dict):
            raise _FieldError(f"field 'meta' must be an object, got {type(meta).__name__}")
        return cls(value["id"], value["subject"], value["prompt"], value["reference"], generated, meta, line)

    @classmethod
    def _preference_from_json(cls, value: dict[str, Any], line: int | None) -> ManifestRecord:
        both = [k for k in ("reference", "generated") if k in value]
        if both:
            raise _FieldError(
                f"a preference record (winner/loser) has no {both}: give either reference + generated, or winner + "
                "loser"
            )
        missing = [k for k in _PREFERENCE_REQUIRED if k not in value]
        if missing:
            raise _FieldError(f"missing field(s) {missing} of a preference record (id, prompt, winner, loser)")
        unknown = sorted(set(value) - set(_PREFERENCE_FIELDS))
        if unknown:
            raise _FieldError(f"unknown field(s) {unknown} (a preference record allows: {list(_PREFERENCE_FIELDS)})")
        for key in ("id", "winner"):
            if not isinstance(value[key], str) or not value[key]:
                raise _FieldError(f"field '{key}' must be a non-empty string, got {value[key]!r}")
        subject = value.get("subject", "")
        if not isinstance(subject, str):
            raise _FieldError(f"field 'subject' must be a string, got {subject!r}")
        if not isinstance(value["prompt"], str):
            raise _FieldError(f"field 'prompt' must be a string, got {value['prompt']!r}")
        loser = GeneratedImage.from_json(value["loser"], "loser")
        meta = value.get("meta", {})
        if not isinstance(meta, dict):
            raise _FieldError(f"field 'meta' must be an object, got {type(meta).__name__}")
        return cls(value["id"], subject, value["prompt"], value["winner"], [loser], meta, line, "preference")


@dataclass(frozen=True)
class ManifestPair:
    """One training pair of a manifest: the record's reference and its ``k``-th generated image (paths resolved)."""

    record_id: str
    k: int
    subject: str
    prompt: str
    reference: Path
    generated: Path
    q_ref: Path | None
    q_gen: Path | None
    line: int | None = None
    #: a plain preference pair (winner / loser): ``reference`` is the winner, not a reference photo of a subject
    preference: bool = False

    @property
    def has_maps(self) -> bool:
        return self.q_ref is not None and self.q_gen is not None


# ----------------------------------------------------------------------------------------------------------------
# Problems and reports
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestProblem:
    """One problem of one manifest line (``record_id`` is None when the line could not be parsed)."""

    line: int | None
    record_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "record"
        if self.record_id is not None:
            where += f" (id {self.record_id!r})"
        return f"{where}: {self.message}"


def _format_problems(problems: Sequence[ManifestProblem]) -> str:
    lines = [f"  - {p}" for p in problems[:_MESSAGE_LIMIT]]
    if len(problems) > _MESSAGE_LIMIT:
        lines.append(f"  ... and {len(problems) - _MESSAGE_LIMIT} more (see .problems)")
    return "\n".join(lines)


class ManifestError(ValueError):
    """An unreadable manifest, or one with bad records; ``problems`` lists every problem with its line."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, problems=()) -> None:
        self.path = Path(path) if path is not None else None
        self.problems: list[ManifestProblem] = list(problems)
        head = f"{self.path}: {message}" if self.path is not None else message
        super().__init__(head + ("\n" + _format_problems(self.problems) if self.problems else ""))


@dataclass
class ValidationReport:
    """Outcome of validating a manifest: every problem, and which lines / records are bad."""

    num_records: int = 0
    problems: list[ManifestProblem] = field(default_factory=list)
    map_size: tuple[int, int] | None = None
    """The quality-map size found (header's ``map_size`` or the first map read)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_lines(self) -> list[int]:
        """Sorted line numbers with at least one problem."""
        return sorted({p.line for p in self.problems if p.line is not None})

    @property
    def num_bad(self) -> int:
        """Number of bad lines (records that will be / were skipped)."""
        return len(self.bad_lines)

    def format(self) -> str:
        """Human-readable summary: counts, then one line per problem."""
        if self.ok:
            return f"{self.num_records} records, no problems"
        head = f"{self.num_bad} bad of {self.num_records + self.num_bad} records"
        return head + ":\n" + _format_problems(self.problems)


def is_manifest_file(path: str | os.PathLike[str]) -> bool:
    """Whether the first line of ``path`` is a patchdpo-manifest header (cheap: reads one line)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
        header = json.loads(first)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and header.get("format") == MANIFEST_FORMAT


def _check_header(header: Any, path: Path | None) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f'line 1 must be the header {{"format": "{MANIFEST_FORMAT}", "version": {MANIFEST_VERSION}, ...}}', path
        )
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"header 'version' must be an integer, got {version!r}", path)
    if version > MANIFEST_VERSION:
        raise ManifestError(
            f"manifest version {version} is newer than this library reads ({MANIFEST_VERSION}); upgrade patchdpo_fast",
            path,
        )
    if version < 1:
        raise ManifestError(f"unknown manifest version {version}", path)
    size = header.get("map_size")
    if size is not None and (
        not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ManifestError(f"header 'map_size' must be [h, w] (positive integers) or null, got {size!r}", path)
    return header


def relative_path(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to the folder ``root`` (both made absolute, symlinks kept), with POSIX separators."""
    return _relative_to(Path(os.path.abspath(path)), Path(os.path.abspath(root)))


def _relative_to(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.as_posix()


# ----------------------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------------------


class Manifest:
    """A PatchDPO manifest in memory: header, records and where relative paths point.

    Build one with :meth:`load` (validating), :meth:`create` (empty, to append to) or the constructor.

    Args:
        path: the manifest file (relative paths are resolved against its folder); may not exist yet.
        records: the records.
        header: header fields besides ``format`` / ``version`` (e.g. ``map_size``, ``generation``, ``source``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        records: Iterable[ManifestRecord] = (),
        header: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.header: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
        for key, value in (header or {}).items():
            if key not in ("format", "version"):
                self.header[key] = copy.deepcopy(value)
        self.records: list[ManifestRecord] = list(records)
        self.report = ValidationReport(num_records=len(self.records))
        self._by_id: dict[str, int] | None = None

    # ------------------------------------------------------------------ basics
    @property
    def root(self) -> Path:
        """Folder that relative paths are resolved against."""
        return self.path.parent

    @property
    def map_size(self) -> tuple[int, int] | None:
        """The quality-map size ``(h, w)`` declared in the header, if any."""
        size = self.header.get("map_size")
        return (int(size[0]), int(size[1])) if size else None

    @map_size.setter
    def map_size(self, size: tuple[int, int] | None) -> None:
        self.header["map_size"] = None if size is None else [int(size[0]), int(size[1])]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ManifestRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, records={len(self.records)}, pairs={self.num_pairs})"

    @property
    def num_pairs(self) -> int:
        """Training pairs: one per generated image."""
        return sum(len(r.generated) for r in self.records)

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """A manifest path (relative to :attr:`root`, or absolute) as a filesystem path.

        ``..`` components are collapsed lexically, the way :meth:`relative` writes them (symlinks are not followed).
        """
        p = Path(path)
        return p if p.is_absolute() else Path(os.path.normpath(self.root / p))

    def relative(self, path: str | os.PathLike[str]) -> str:
        """A filesystem path as written in the manifest (relative to :attr:`root`, POSIX separators)."""
        return relative_path(path, self.root)

    def _index(self) -> dict[str, int]:
        if self._by_id is None or len(self._by_id) != len(self.records):
            self._by_id = {r.id: i for i, r in enumerate(self.records)}
        return self._by_id

    def _find(self, record_id: str) -> int | None:
        index = self._index().get(record_id)
        if index is None or index >= len(self.records) or self.records[index].id != record_id:
            self._by_id = None  # records were changed in place: rebuild once
            index = self._index().get(record_id)
        return index

    def get(self, record_id: str) -> ManifestRecord:
        """The record with ``record_id``.

        Raises:
            KeyError: no such record.
        """
        index = self._find(record_id)
        if index is None:
            raise KeyError(f"no record with id {record_id!r} in {self.path}")
        return self.records[index]

    def __contains__(self, record_id: object) -> bool:
        return isinstance(record_id, str) and self._find(record_id) is not None

    # ------------------------------------------------------------------ reading
    @classmethod
    def create(cls, path: str | os.PathLike[str], header: Mapping[str, Any] | None = None) -> Manifest:
        """An empty manifest at ``path``, written to disk at once (header only)."""
        manifest = cls(path, header=header)
        manifest.save()
        return manifest

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        check: CheckLevel = "quick",
        on_bad_record: BadRecordPolicy = "error",
        max_bad_records: int | None = None,
        workers: int = 4,
    ) -> Manifest:
        """Read and validate a manifest.

        Args:
            path: the ``.jsonl`` manifest.
            check: ``"none"`` checks the JSON and the schema only; ``"quick"`` (default) also checks that every file
                exists, that images have a readable header and quality maps a readable header with the manifest's
                map size; ``"full"`` also decodes every image and reads every map's values (must be in [0, 1]).
            on_bad_record: ``"error"`` raises one :class:`ManifestError` naming every bad line; ``"skip"`` drops the
                bad records (logging a summary) and keeps the report on ``manifest.report``.
            max_bad_records: with ``"skip"``, still fail when more records than this are bad (None: no limit).
            workers: threads used for the file checks.

        Raises:
            FileNotFoundError: no manifest at ``path``.
            ManifestError: unreadable file or header; bad records (see ``on_bad_record``).
        """
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"cannot read manifest: {exc}", path) from None
        lines = text.splitlines()
        if not lines:
            raise ManifestError("empty file (line 1 must be the manifest header)", path)
        try:
            header = json.loads(lines[0])
        except ValueError as exc:
            raise ManifestError(f"line 1 (the header) is not valid JSON: {exc}", path) from None
        header = _check_header(header, path)

        problems: list[ManifestProblem] = []
        records: list[ManifestRecord] = []
        seen: dict[str, int] = {}
        for number, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                problems.append(ManifestProblem(number, None, f"bad JSON: {exc}"))
                continue
            rid = value.get("id") if isinstance(value, dict) and isinstance(value.get("id"), str) else None
            try:
                record = ManifestRecord.from_json(value, number)
            except _FieldError as exc:
                problems.append(ManifestProblem(number, rid, str(exc)))
                continue
            if record.id in seen:
                problems.append(ManifestProblem(number, record.id, f"duplicate id (first on line {seen[record.id]})"))
                continue
            seen[record.id] = number
            records.append(record)

        manifest = cls(path, records, header)
        report = manifest.validate(check, workers=workers)
        report.problems = sorted(problems + report.problems, key=lambda p: p.line or 0)
        bad = set(report.bad_lines)
        manifest.records = [r for r in records if r.line not in bad]
        report.num_records = len(manifest.records)
        manifest.report = report
        if report.ok:
            return manifest
        if on_bad_record == "error":
            raise ManifestError(
                f"{report.num_bad} bad record(s) (data.on_bad_record=skip would drop them)", path, report.problems
            )
        if max_bad_records is not None and report.num_bad > max_bad_records:
            raise ManifestError(
                f"{report.num_bad} bad record(s), more than max_bad_records={max_bad_records}", path, report.problems
            )
        logger.warning("%s: skipping %d bad record(s):\n%s", path, report.num_bad, _format_problems(report.problems))
        return manifest

    # ------------------------------------------------------------------ validation
    def validate(self, check: CheckLevel = "quick", *, workers: int = 4) -> ValidationReport:
        """Check the in-memory records (schema, unique ids and, unless ``check="none"``, their files).

        Quality maps must all have one size: the header's ``map_size`` when declared, else the first map read.
        Returns a :class:`ValidationReport`; nothing is raised or dropped.
        """
        if check not in ("none", "quick", "full"):
            raise ValueError(f"check must be 'none', 'quick' or 'full', got {check!r}")
        problems: list[ManifestProblem] = []
        seen: set[str] = set()
        for rec in self.records:
            try:
                ManifestRecord.from_json(rec.to_json())
            except _FieldError as exc:
                problems.append(ManifestProblem(rec.line, rec.id, str(exc)))
            if rec.id in seen:
                problems.append(ManifestProblem(rec.line, rec.id, "duplicate id"))
            seen.add(rec.id)
        declared = self.map_size
        found_sizes: list[list[tuple[str, tuple[int, int]]]] = [[] for _ in self.records]
        if check != "none":
            full = check == "full"

            def check_record(i: int) -> list[ManifestProblem]:
                rec = self.records[i]
                out: list[ManifestProblem] = []

                def image(label: str, rel: str) -> None:
                    try:
                        probe_image(self.resolve(rel), decode=full)
                    except FileNotFoundError:
                        out.append(ManifestProblem(rec.line, rec.id, f"missing file: {label} {rel!r}"))
                    except ValueError as exc:
                        out.append(ManifestProblem(rec.line, rec.id, f"unreadable image: {label}: {exc}"))

                pref = rec.kind == "preference"
                image("winner" if pref else "reference", rec.reference)
                for k, gen in enumerate(rec.generated):
                    image("loser" if pref else f"generated[{k}].image", gen.image)
                    for side in ("q_ref", "q_gen"):
                        rel = getattr(gen, side)
                        if rel is None:
                            continue
                        label = f"generated[{k}].{side}"
                        try:
                            found_sizes[i].append((label, probe_quality_map(self.resolve(rel), full=full)))
                        except FileNotFoundError:
                            out.append(ManifestProblem(rec.line, rec.id, f"missing file: {label} {rel!r}"))
                        except ValueError as exc:
                            out.append(ManifestProblem(rec.line, rec.id, f"unreadable quality map: {label}: {exc}"))
                return out

            indices = range(len(self.records))
            if workers > 1 and len(self.records) > 8:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    results = list(pool.map(check_record, indices))
            else:
                results = [check_record(i) for i in indices]
            for found in results:
                problems.extend(found)
        expected = declared
        for rec, sizes in zip(self.records, found_sizes, strict=True):
            for label, size in sizes:
                if expected is None:
                    expected = size
                if size != expected:
                    origin = "the header's map_size" if declared is not None else "the first quality map"
                    problems.append(
                        ManifestProblem(
                            rec.line, rec.id, f"wrong map size: {label} is {list(size)}, {origin} is {list(expected)}"
                        )
                    )
        problems.sort(key=lambda p: p.line or 0)
        bad = {(p.line, p.record_id) for p in problems}
        return ValidationReport(
            num_records=sum(1 for r in self.records if (r.line, r.id) not in bad),
            problems=problems,
            map_size=expected,
        )

    # ------------------------------------------------------------------ writing
    def to_text(self) -> str:
        """The manifest as JSONL text (header line first)."""
        header = {k: v for k, v in self.header.items() if v is not None or k in ("format", "version")}
        return json.dumps(header, ensure_ascii=False) + "\n" + "".join(r.to_line() for r in self.records)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the manifest atomically (to ``path`` if given: relative paths are then rewritten for its folder)."""
        if path is not None and os.path.abspath(path) != os.path.abspath(self.path):
            self.rebase(path)
        atomic_write_bytes(self.path, self.to_text().encode("utf-8"))
        for i, rec in enumerate(self.records):
            rec.line = i + 2
        return self.path

    def rebase(self, path: str | os.PathLike[str]) -> None:
        """Move the manifest to ``path`` in memory, rewriting relative paths so they point at the same files."""
        new = Path(path)
        old_root, new_root = Path(os.path.abspath(self.root)), Path(os.path.abspath(new.parent))
        if old_root != new_root:

            def move(rel: str | None) -> str | None:
                if rel is None or Path(rel).is_absolute():
                    return rel
                return _relative_to(old_root / rel, new_root)

            for rec in self.records:
                rec.reference = move(rec.reference)  # type: ignore[assignment]
                for gen in rec.generated:
                    gen.image = move(gen.image)  # type: ignore[assignment]
                    gen.q_ref, gen.q_gen = move(gen.q_ref), move(gen.q_gen)
        self.path = new

    def append(self, records: Iterable[ManifestRecord], *, check: CheckLevel = "quick") -> None:
        """Add records and rewrite the file atomically.

        The new records are validated first (schema, ids unique in the whole manifest and, with ``check``, their
        files); nothing is written if any of them is bad.

        Raises:
            ManifestError: naming every bad new record.
        """
        new = list(records)
        if not new:
            return
        probe = Manifest(self.path, new, self.header)
        for i, rec in enumerate(probe.records):
            rec.line = len(self.records) + 2 + i
        report = probe.validate(check)
        problems = list(report.problems)
        existing = self._index()
        problems += [
            ManifestProblem(r.line, r.id, "duplicate id (already in the manifest)") for r in new if r.id in existing
        ]
        if problems:
            raise ManifestError(
                "refusing to append bad records", self.path, sorted(problems, key=lambda p: p.line or 0)
            )
        if self.map_size is None and report.map_size is not None and any(g.has_maps for r in new for g in r.generated):
            self.map_size = report.map_size
        self.records.extend(new)
        self._by_id = None
        self.save()

    def set_quality_maps(
        self,
        record_id: str,
        k: int,
        q_ref: str | os.PathLike[str] | None,
        q_gen: str | os.PathLike[str] | None,
        *,
        check: bool = True,
    ) -> None:
        """Record (or, with None, clear) the quality maps of generated image ``k`` of a record, in memory.

        Paths may be filesystem paths (made relative to the manifest) or manifest-relative strings. With ``check``
        both files must exist and have the manifest's map size; the first maps set define ``map_size`` when the
        header has none. Call :meth:`save` to write.

        Raises:
            KeyError: unknown record; IndexError: no generated image ``k``; ValueError: only one side given, or a
            file with the wrong size; FileNotFoundError: a missing file (with ``check``).
        """
        rec = self.get(record_id)
        if not 0 <= k < len(rec.generated):
            raise IndexError(f"record {record_id!r} has {len(rec.generated)} generated image(s), no index {k}")
        if (q_ref is None) != (q_gen is None):
            raise ValueError("q_ref and q_gen are set together")
        gen = rec.generated[k]
        if q_ref is None:
            gen.q_ref = gen.q_gen = None
            return
        rels = [self._as_manifest_path(p) for p in (q_ref, q_gen)]
        if check:
            for rel in rels:
                size = probe_quality_map(self.resolve(rel))
                if self.map_size is None:
                    self.map_size = size
                elif size != self.map_size:
                    raise ValueError(
                        f"quality map {rel} is {list(size)}, the manifest's map_size is {list(self.map_size)}"
                    )
        gen.q_ref, gen.q_gen = rels

    def _as_manifest_path(self, path: str | os.PathLike[str]) -> str:
        if isinstance(path, Path) or Path(path).is_absolute():
            return self.relative(path)
        return Path(path).as_posix()

    def default_map_paths(self, record_id: str, k: int, folder: str = "maps") -> tuple[Path, Path]:
        """Suggested ``(q_ref, q_gen)`` files of a pair: ``<root>/<folder>/<record id>/<k>.q_{ref,gen}.safetensors``.

        The record id is made filesystem-safe (characters outside ``[A-Za-z0-9._-]`` and path separators become
        ``_``; a short hash keeps distinct ids distinct).
        """
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._") or "record"
        if safe != record_id:
            safe = f"{safe[:80]}-{hashlib.sha1(record_id.encode('utf-8')).hexdigest()[:8]}"
        base = self.root / folder / safe
        return base / f"{k}.q_ref.safetensors", base / f"{k}.q_gen.safetensors"

    # ------------------------------------------------------------------ pairs
    def pairs(self) -> list[ManifestPair]:
        """Every training pair ``(reference, generated[k])`` in record order, paths resolved."""
        out = []
        for rec in self.records:
            ref = self.resolve(rec.reference)
            for k, gen in enumerate(rec.generated):
                out.append(
                    ManifestPair(
                        record_id=rec.id,
                        k=k,
                        subject=rec.subject,
                        prompt=rec.prompt,
                        reference=ref,
                        generated=self.resolve(gen.image),
                        q_ref=self.resolve(gen.q_ref) if gen.q_ref is not None else None,
                        q_gen=self.resolve(gen.q_gen) if gen.q_gen is not None else None,
                        line=rec.line,
                        preference=rec.kind == "preference",
                    )
                )
        return out

    def pairs_missing_maps(self) -> list[ManifestPair]:
        """The pairs whose quality maps are not computed yet."""
        return [p for p in self.pairs() if not p.has_maps]

    # ------------------------------------------------------------------ identity
    def content_hash(self) -> str:
        """SHA-256 of the manifest's text as :meth:`to_text` writes it."""
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    def files_fingerprint(self) -> str:
        """SHA-256 over every referenced file's path, size and modification time (missing files included)."""
        digest = hashlib.sha256()
        seen: set[str] = set()
        for rec in self.records:
            names = [rec.reference]
            for gen in rec.generated:
                names += [n for n in (gen.image, gen.q_ref, gen.q_gen) if n is not None]
            for name in names:
                if name in seen:
                    continue
                seen.add(name)
                try:
                    st = self.resolve(name).stat()
                    stamp = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    stamp = "missing"
                digest.update(f"{name}\0{stamp}\n".encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------


def merge_manifests(
    parts: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    header: Mapping[str, Any] | None = None,
    sort_key: Callable[[ManifestRecord], Any] | None = None,
    check: CheckLevel = "none",
    save: bool = True,
) -> Manifest:
    """Merge manifests (e.g. the per-shard parts of ``build-pairs``) into one, written atomically to ``out``.

    Relative paths are rewritten for ``out``'s folder. A record id found in several parts must have identical
    content there (it is then kept once). The header is ``header`` if given, else the first part's header.
    With ``save=False`` the merged manifest is only returned, not written.

    Raises:
        ManifestError: a part is unreadable, or one id has different content in two parts.
    """
    if not parts:
        raise ValueError("no manifests to merge")
    loaded = [Manifest.load(p, check=check) for p in parts]
    merged = Manifest(out, header=header if header is not None else loaded[0].header)
    by_id: dict[str, tuple[ManifestRecord, str]] = {}
    problems: list[ManifestProblem] = []
    for part in loaded:
        name = part.path.name
        part.rebase(out)
        for rec in part.records:
            if rec.id in by_id:
                first, origin = by_id[rec.id]
                if first.to_json() != rec.to_json():
                    problems.append(
                        ManifestProblem(rec.line, rec.id, f"in {name}: differs from the record in {origin}")
                    )
                continue
            by_id[rec.id] = (rec, name)
            merged.records.append(rec)
    if problems:
        raise ManifestError("conflicting records", out, problems)
    if sort_key is not None:
        merged.records.sort(key=sort_key)
    sizes = {m.map_size for m in loaded if m.map_size is not None}
    if merged.map_size is None and len(sizes) == 1:
        merged.map_size = sizes.pop()
    if save:
        merged.save()
    return merged
