"""The model repository and its manifest: what makes an exported model file self-describing.

Layout (numeric versions, newest = highest, as in TF Serving and Triton)::

    models/<name>/<version>/model.onnx     the graph, one self-contained file
    models/<name>/<version>/vocab.json     categorical vocabularies, "<entity>.<feature>" -> values
                                           (empty for a hashed feature: see below)
    models/<name>/<version>/manifest.json  this module's `Manifest`
    models/<name>/<version>/report.md ...  evaluation report and plots (optional)

A hashed categorical (`ranker.schema.HashedVocabulary`, a spec's `hash_buckets`) has no value
list: its entry in the manifest's `features` carries `hash_buckets` and `hash` (the function's
name, `ranker.schema.HASH_FUNCTION`) next to `vocab_size` = buckets + 1, and
`FeatureSchema.from_description` rebuilds the same encoder from them; a hash it does not know
is refused, so a loader never encodes with another function than the trainer did.

A version directory is complete once `manifest.json` exists: exporters write it last, through a
rename, so a watcher never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ranker.schema import FeatureSchema

MANIFEST_FORMAT = 1
MODEL_FILE = "model.onnx"
VOCAB_FILE = "vocab.json"
MANIFEST_FILE = "manifest.json"
GATES_OUTPUT = "gates"
GATES_LEVELS_OUTPUT = "gates_levels"  # PLE: every level's task gates [N, L, T, M]


class ManifestError(ValueError):
    """A model version that is incomplete, corrupt or inconsistent with itself."""


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[str | int]


class Golden(BaseModel):
    """Encoded inputs and the outputs PyTorch gave for them: a loader's proof the file works."""

    inputs: dict[str, list[Any]]
    outputs: dict[str, list[Any]]
    atol: float = 1e-5


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = MANIFEST_FORMAT
    name: str
    version: int = Field(ge=1)
    created_at: str
    model_type: Literal["mmoe", "omoe", "shared_bottom", "ple", "cgc"]
    tasks: list[str]  # in output order; each is an output of the graph
    task_kind: Literal["binary", "regression"] = "binary"
    n_experts: int = 0  # 0 for models without gates
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    features: dict[str, Any]  # FeatureSchema.describe()
    config: dict[str, Any]  # the model's config dataclass, as a dict
    metrics: dict[str, Any] = Field(default_factory=dict)
    training_data: dict[str, Any] = Field(default_factory=dict)  # dataset name, sha256, row counts
    files: dict[str, FileEntry]
    golden: Golden

    @property
    def schema_version(self) -> str:
        return str(self.features["version"])

    @property
    def has_gates(self) -> bool:
        return any(o.name == GATES_OUTPUT for o in self.outputs)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def load_manifest(version_dir: Path) -> Manifest:
    path = Path(version_dir) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: no manifest") from e
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise ManifestError(f"{path}: invalid manifest: {e}") from e


def verify_files(version_dir: Path, manifest: Manifest) -> None:
    """Raise ManifestError unless every file the manifest lists has its recorded size and sha256."""
    for fname in (MODEL_FILE, VOCAB_FILE):
        if fname not in manifest.files:
            raise ManifestError(f"manifest lists no {fname}")
    for fname, entry in manifest.files.items():
        path = Path(version_dir) / fname
        if not path.is_file():
            raise ManifestError(f"{path}: missing")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ManifestError(f"{path}: sha256 does not match the manifest")


def load_schema(version_dir: Path, manifest: Manifest) -> FeatureSchema:
    """The feature schema with its vocabularies; checks it against the manifest's inputs."""
    vocab = json.loads((Path(version_dir) / VOCAB_FILE).read_text())
    try:
        schema = FeatureSchema.from_description(manifest.features, vocab)
    except (KeyError, ValueError) as e:
        raise ManifestError(f"{version_dir}: feature schema: {e}") from e
    expected = [(s.name, s.dtype, s.shape[-1]) for s in manifest.inputs]
    derived = [(s.name, s.dtype, s.width) for s in schema.input_specs()]
    if expected != derived:
        raise ManifestError(f"{version_dir}: manifest inputs {expected} != schema inputs {derived}")
    return schema


def list_versions(repo: Path, name: str) -> list[int]:
    """Complete versions (those with a manifest) of model `name`, oldest first."""
    base = Path(repo) / name
    if not base.is_dir():
        return []
    return sorted(
        int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()
    )


def version_dir(repo: Path, name: str, version: int) -> Path:
    return Path(repo) / name / str(version)


def next_version(repo: Path, name: str) -> int:
    base = Path(repo) / name
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(taken, default=0) + 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers see all of it or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model is read by other users (containers)
    os.replace(tmp, path)


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(version_dir) / MANIFEST_FILE, manifest.model_dump(mode="json"))
