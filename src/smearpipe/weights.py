"""Weights registry: every shipped weight file comes with a record.

A record (``weights/<name>.json``) names the file and its sha256, the classes, the input size, the
preprocessing the model was trained with (a :class:`~smearpipe.preprocess.Preprocessing`), the training
data and split, and the metrics measured. Loading checks the sha256; an unknown name raises, nothing
ever falls back silently to other or random weights.

The registry folder is ``$SMEARPIPE_WEIGHTS_DIR`` when set, else the repository's ``weights/`` folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import WeightsError
from .preprocess import Preprocessing

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_CLASSIFIER",
    "WeightsRecord",
    "weights_dir",
    "available",
    "resolve",
    "sha256_file",
]

DEFAULT_DETECTOR = "detector-bccd-yolov8n-v5"
DEFAULT_CLASSIFIER = "classifier-vgg16bn-v8"

_KINDS = ("detector", "classifier")


def weights_dir() -> Path:
    """Folder holding shipped weight files and their records."""
    env = os.environ.get("SMEARPIPE_WEIGHTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "weights"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class WeightsRecord:
    """Description of one weight file (see the module docstring).

    ``metadata`` holds the rest of the record (training data and split, metrics, mean/std, ...).
    """

    name: str
    kind: str
    file: str
    sha256: str
    classes: tuple[str, ...]
    input_size: int
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    folder: str = ""  # where ``file`` lives (not serialised)

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.file

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "classes": list(self.classes),
            "input_size": self.input_size,
            "preprocessing": self.preprocessing.to_dict(),
            **{k: v for k, v in self.metadata.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, folder: str | os.PathLike = "") -> WeightsRecord:
        try:
            kind = str(data["kind"])
            if kind not in _KINDS:
                raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
            core = {"name", "kind", "file", "sha256", "classes", "input_size", "preprocessing"}
            classes = data["classes"]
            if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) and c for c in classes)
                    and len(set(classes)) == len(classes)):
                raise ValueError(f"classes must be a list of distinct non-empty names, got {classes!r}")
            size = data["input_size"]
            if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 8192:
                raise ValueError(f"input_size must be an integer from 8 to 8192 px, got {size!r}")
            sha = data["sha256"]
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)):
                raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha!r}")
            return cls(
                name=str(data["name"]),
                kind=kind,
                file=str(data["file"]),
                sha256=sha.lower(),
                classes=tuple(classes),
                input_size=size,
                preprocessing=Preprocessing.from_dict(data.get("preprocessing") or {}),
                metadata={k: v for k, v in data.items() if k not in core},
                folder=str(folder),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"malformed weights record: {exc!r}") from None

    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"refusing to overwrite existing record {path}")
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def verify(self) -> None:
        """Raise :class:`WeightsError` if the file is missing or its sha256 differs from the record."""
        if not self.path.is_file():
            raise WeightsError(f"weights file of {self.name!r} not found: {self.path}")
        digest = sha256_file(self.path)
        if digest != self.sha256:
            raise WeightsError(
                f"sha256 of {self.path} is {digest}, but its record {self.name!r} says {self.sha256}: "
                "the file is corrupt or was replaced; refusing to load it"
            )


def _read_record(json_path: Path) -> WeightsRecord:
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read weights record {json_path}: {exc}") from None
    try:
        return WeightsRecord.from_dict(data, folder=json_path.parent)
    except WeightsError as exc:
        raise WeightsError(f"{json_path}: {exc}") from None


def available(kind: str | None = None) -> list[str]:
    """Names of the registered weights (optionally of one kind)."""
    folder = weights_dir()
    names = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = _read_record(p)
        except WeightsError:
            continue
        if kind is None or rec.kind == kind:
            names.append(rec.name)
    return names


def resolve(name_or_path: str | os.PathLike, *, kind: str) -> WeightsRecord | Path:
    """Find a registered record by name (verified), or return a user file path.

    A path ``X.pt`` / ``X.safetensors`` that has a record ``X.json`` beside it returns that record
    (verified); a path without a record is returned as a ``Path`` for the caller to inspect.

    Raises
    ------
    WeightsError
        Unknown name, missing file, wrong kind, sha256 mismatch.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{kind} weights must be a registered name or a file path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if not text:
        raise WeightsError(f"empty {kind} weights name; registered: {available(kind) or 'none'} (None: the shipped default)")
    candidate = Path(text)
    if candidate.suffix in (".pt", ".pth", ".safetensors", ".json") or candidate.exists() or os.sep in text:
        if not candidate.exists():
            raise WeightsError(f"weights file not found: {candidate}")
        if candidate.suffix == ".json":
            rec = _read_record(candidate)
        else:
            sidecar = candidate.with_suffix(".json")
            if not sidecar.is_file():
                return candidate
            rec = _read_record(sidecar)
            if rec.path.resolve() != candidate.resolve():
                raise WeightsError(f"record {sidecar} describes {rec.path}, not {candidate}")
    else:
        record_path = weights_dir() / f"{text}.json"
        if not record_path.is_file():
            raise WeightsError(
                f"unknown {kind} weights {text!r}; registered: {available(kind) or 'none'} "
                f"(registry folder {weights_dir()}); pass a file path for your own weights"
            )
        rec = _read_record(record_path)
    if rec.kind != kind:
        raise WeightsError(f"weights {rec.name!r} are {rec.kind} weights, expected {kind}")
    rec.verify()
    return rec
