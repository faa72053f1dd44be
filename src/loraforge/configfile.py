"""Reading a YAML config file into the fields of a config dataclass (shared by every command)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import ConfigError


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """The values of a YAML mapping, checked against the fields of the dataclass ``cls``.

    Raises:
        ConfigError: unreadable YAML (with its line), unknown keys (with close matches and the
            list of known keys), or a value of the wrong type (with the key).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {p}: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(loaded).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    known = tuple(f.name for f in dataclasses.fields(cls))
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{p}: unknown key(s) {', '.join(hints)}; known keys: {', '.join(known)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if types[k].startswith("float") and isinstance(v, str):
            values[k] = v = _number(v)  # YAML 1.1 reads 1e-3 as a string
        _check_type(k, v, types[k], p)
    return values


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_type(key: str, value: Any, annotation: str, path: Path) -> None:
    ok = True
    if value is None:
        ok = "None" in annotation
    elif annotation.startswith("bool"):
        ok = isinstance(value, bool)
    elif annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif annotation.startswith("str"):
        ok = isinstance(value, str)
    elif annotation.startswith("list"):
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value))
    if not ok:
        raise ConfigError(f"{path}: {key}: expected {annotation}, got {value!r}")
