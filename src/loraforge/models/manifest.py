"""The adapter manifest: ``manifest.json`` beside the PEFT files, read and written only here.

Training writes it (its presence marks a complete run), evaluation records its verdict in it, the
adapter store checks it before it registers the weights, and everything that comes next (the
registry, release governance, exports) reads it through :class:`AdapterManifest`. The file stays
plain JSON that any tool can read; this module is the one place that knows its fields.

A manifest is validated when it is read: a missing or mistyped field is named in the error, with
what to do about it. Fields a newer version added are kept as they are (``extra="allow"``), so a
read-modify-write by this version loses nothing, and a ``format_version`` newer than this code
understands is refused rather than half-read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraforge.errors import ModelError
from loraforge.files import write_text_atomic

FILENAME = "manifest.json"
KIND: Literal["loraforge.adapter"] = "loraforge.adapter"
FORMAT_VERSION = 1
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class BaseModelRecord(_Record):
    """The base model an adapter was trained on: its name and the hash of its weights."""

    name: str = Field(min_length=1)
    sha256: str = ""
    path: str = ""
    source: str = ""


class GovernanceFlag(_Record):
    """One governance exception a training run took (unlicensed data, secrets kept, …)."""

    flag: str
    detail: str


class AdapterManifest(_Record):
    """Everything known about one trained adapter: lineage, evidence, metrics and checksums."""

    kind: Literal["loraforge.adapter"] = KIND
    format_version: int = FORMAT_VERSION
    created: str = ""
    base_model: BaseModelRecord
    datasets: list[dict[str, Any]] = []
    split: dict[str, Any] = {}
    licensing: dict[str, Any] | None = None
    data_governance: dict[str, Any] | None = None
    # every governance exception taken, shown wherever the adapter is (report, registry, API);
    # None in manifests written before the field existed: see :meth:`flags`
    governance_flags: list[GovernanceFlag] | None = None
    config: dict[str, Any] = {}
    precision: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    estimate: dict[str, Any] = {}
    actual: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    libraries: dict[str, str] = {}
    machine: dict[str, Any] = {}
    warnings: list[str] = []
    files: dict[str, Any] = {}
    # verified by `loraforge adapters add` and by the server before it loads the weights
    checksums: dict[str, str] = {}
    fingerprint: str = ""
    evaluation: dict[str, Any] | None = None

    # --- reading -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | bytes, where: str | Path) -> AdapterManifest:
        """A manifest from the text of ``where``.

        Raises:
            ModelError: not JSON, not an object, a newer format, or a field missing or mistyped
                (the message names the field).
        """
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ModelError(f"{where}: not valid JSON ({e})") from e
        return cls.from_json(raw, where)

    @classmethod
    def from_json(cls, raw: Any, where: str | Path) -> AdapterManifest:
        """A manifest from its decoded JSON (see :meth:`parse`)."""
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ModelError(
                f"{where}: format_version {version} was written by a newer loraforge (this one reads up to "
                f"{FORMAT_VERSION}); upgrade loraforge to use this adapter"
            )
        if not isinstance(raw.get("base_model"), dict) or "name" not in raw["base_model"]:
            raise ModelError(f"{where} does not name its base model (field base_model.name); pass --base-model")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"field {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors(include_url=False)
            )
            raise ModelError(
                f"{where}: {problems}; the manifest is damaged: retrain the adapter or restore its {FILENAME}"
            ) from e

    # --- what callers ask of it ----------------------------------------------------------------
    def flags(self) -> list[dict[str, str]]:
        """The governance exceptions of the run, as ``{"flag", "detail"}`` dicts.

        A manifest written before ``governance_flags`` existed gets them derived from the evidence it
        does hold (``licensing``, ``data_governance``); one with neither has none to show.
        """
        if self.governance_flags is not None:
            return [{"flag": f.flag, "detail": f.detail} for f in self.governance_flags]
        if self.licensing is None and self.data_governance is None:
            return []
        from loraforge.data.governance import flags_from_evidence

        return flags_from_evidence(self.licensing or {}, self.data_governance or {})

    def dataset(self, role: str) -> dict[str, Any] | None:
        """The record of the ``train`` or ``validation`` dataset, if the run had one."""
        return next((d for d in self.datasets if d.get("role") == role), None)

    def lineage(self) -> dict[str, Any]:
        """Where the adapter came from, as the registry keeps it: base model (with its hash), the
        datasets (paths, hashes, licences), the licence and governance evidence, the config."""
        return {
            "base_model": self.base_model.model_dump(mode="json"),
            "datasets": self.datasets,
            "licensing": self.licensing,
            "data_governance": self.data_governance,
            "config": self.config,
        }

    def context_length(self, default: int = 2048) -> int:
        """The longest example the adapter was trained on, in tokens."""
        return int(self.config.get("context_length") or default)

    # --- writing -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON object of the file: the fields set by the writer or present when read, in order."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, adapter: Path) -> Path:
        """Replace ``adapter/manifest.json`` atomically with this manifest."""
        path = adapter / FILENAME
        write_text_atomic(path, json.dumps(self.to_json(), indent=2))
        return path


def read_manifest(adapter: Path) -> AdapterManifest:
    """The manifest of an adapter directory, checked for the PEFT files beside it.

    Raises:
        ModelError: the directory, a PEFT file or the manifest is missing, or the manifest is invalid.
    """
    if not adapter.is_dir():
        raise ModelError(f"adapter directory {adapter} does not exist")
    for name in PEFT_FILES:
        if not (adapter / name).is_file():
            raise ModelError(f"{adapter} is not a complete adapter: {name} is missing")
    path = adapter / FILENAME
    if not path.is_file():
        raise ModelError(f"{adapter} has no {FILENAME}; was it written by `loraforge train`?")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    return AdapterManifest.parse(text, path)


def manifest_of(value: AdapterManifest | Mapping[str, Any], where: str | Path = FILENAME) -> AdapterManifest:
    """``value`` as an :class:`AdapterManifest` (a decoded JSON object is validated)."""
    return value if isinstance(value, AdapterManifest) else AdapterManifest.from_json(dict(value), where)
