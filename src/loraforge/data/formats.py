"""Dataset formats: OpenAI chat JSONL, Alpaca JSON/JSONL, prompt/completion JSONL and CSV.

Every format is read into the same shape, a list of :class:`Example` (chat messages with the
file and line they came from). Reading never stops at the first problem: each one is collected
as a :class:`Problem` (``file:line: field: message``) so that a user fixes everything in one go.
Error codes follow OpenAI's data-preparation checks where they apply (``data_type``,
``missing_messages_list``, ``message_missing_key``, ``message_unrecognized_key``,
``unrecognized_role``, ``missing_content``, ``example_missing_assistant_message``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraforge.errors import ConfigError

FORMATS = ("auto", "chat", "alpaca", "completion", "csv")
Format = Literal["auto", "chat", "alpaca", "completion", "csv"]
Severity = Literal["error", "warning"]

CHAT_ROLES = ("system", "user", "assistant")
CHAT_MESSAGE_KEYS = ("role", "content", "name", "weight")
ALPACA_KEYS = ("instruction", "input", "output", "system", "source")
COMPLETION_KEYS = ("prompt", "completion", "source")
# CSV columns may be named after these fields (or mapped to them with --columns FIELD=COLUMN).
CSV_FIELDS = ("system", "user", "assistant", "prompt", "completion", "instruction", "input", "output", "source")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1  # 0 = an assistant message shown as context but not trained on (OpenAI's `weight`)


@dataclass(frozen=True)
class Example:
    messages: tuple[Message, ...]
    file: str
    line: int
    source: str | None = None  # the record's "source" tag, matched against the licence manifest


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 for the file as a whole
    field: str
    code: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message} [{self.code}]"


class HasProblems:
    """Mixin: ``errors`` and ``warnings`` views of a ``problems`` list."""

    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass
class LoadResult(HasProblems):
    format: str
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class _Collector:
    def __init__(self, file: str, result: LoadResult) -> None:
        self.file = file
        self.result = result
        self.source: str | None = None  # tag of the record being converted
        self.bad_lines: set[int] = set()  # lines that are not valid UTF-8 (each reported once)

    def error(self, line: int, fld: str, code: str, message: str) -> None:
        self.result.problems.append(Problem(self.file, line, fld, code, message))

    def undecodable(self, first: int, last: int) -> bool:
        """Whether a record on lines ``first..last`` holds a line that is not valid UTF-8.

        Such a record is skipped: its line is already reported, and a record with replacement
        characters in place of the bad bytes must never be trained on.
        """
        return any(first <= n <= last for n in self.bad_lines)


def load_dataset(path: str | Path, format: Format = "auto", columns: dict[str, str] | None = None) -> LoadResult:
    """Read a dataset file into chat examples, collecting every problem found.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.csv`` file.
        format: one of :data:`FORMATS`; ``auto`` looks at the extension and the first record.
        columns: for CSV, ``{field: column}`` where field is one of :data:`CSV_FIELDS`.

    Returns:
        The examples that parsed and the problems of the ones that did not (nothing is raised
        for bad content; a missing file is reported as a problem too).
    """
    p = Path(path)
    name = str(path)
    if format not in FORMATS:
        result = LoadResult(format)
        _Collector(name, result).error(
            0, "format", "unknown_format", f"unknown format {format!r}; use one of {', '.join(FORMATS)}"
        )
        return result
    result = LoadResult(format)
    out = _Collector(name, result)
    if p.is_dir():
        out.error(0, "path", "not_a_file", "this is a directory; give the dataset file inside it")
        return result
    if not p.is_file():
        out.error(0, "path", "file_not_found", "no such file; check the path")
        return result
    try:
        raw = p.read_bytes()
    except OSError as e:
        out.error(0, "path", "unreadable_file", f"cannot read the file: {e.strerror}")
        return result
    if not raw.strip():
        out.error(0, "file", "empty_file", "the file is empty; it needs at least 10 examples")
        return result
    text = _decode(raw, out)
    if text is None:
        return result
    if format == "auto":
        format = _detect(p, text)
        result.format = format
    if format == "csv":
        _read_csv(text, columns or {}, out)
    elif p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        _read_json_array(text, format, out)
    else:
        _read_jsonl(text, format, out)
    return result


def _decode(raw: bytes, out: _Collector) -> str | None:
    """Decode UTF-8, reporting each line with invalid bytes under its own number.

    CRLF (Windows) and lone CR (old Mac) line endings become LF, so that every reader and every
    error counts lines the way an editor does. A bad line keeps its place: its bad bytes become
    U+FFFD, so the lines after it (and, in a JSON array or CSV, the records around it) are still read
    and checked; the record holding it is skipped (see :meth:`_Collector.undecodable`).

    Returns:
        The text with LF line endings, or None when the file is not UTF-8 at all (UTF-16).
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        out.error(
            0, "encoding", "invalid_utf8", "the file is UTF-16 (it starts with a byte-order mark); save it as UTF-8"
        )
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return text.replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    # bytes.splitlines splits at \n, \r and \r\n only, never inside a UTF-8 sequence
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad = " ".join(f"0x{b:02X}" for b in line[e.start : e.end])
            out.error(
                number,
                "encoding",
                "invalid_utf8",
                f"invalid UTF-8 at byte {e.start + 1} of the line ({bad}); save the file as UTF-8 "
                "(bytes like this often mean it was saved as Latin-1 or Windows-1252)",
            )
            out.bad_lines.add(number)
            lines.append(line.decode("utf-8", errors="replace"))
    return "\n".join(lines)


def _detect(path: Path, text: str) -> Format:
    if path.suffix.lower() == ".csv":
        return "csv"
    first: Any = None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
            first = data[0] if isinstance(data, list) and data else None
        except (json.JSONDecodeError, RecursionError):
            first = None
    else:
        for line in text.split("\n"):
            if line.strip():
                try:
                    first = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue
                break
    if isinstance(first, dict):
        if "messages" in first:
            return "chat"
        if "instruction" in first or "output" in first:
            return "alpaca"
        if "prompt" in first or "completion" in first:
            return "completion"
    return "chat"  # the default; its checks explain what a record must look like


def _read_jsonl(text: str, format: Format, out: _Collector) -> None:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or number in out.bad_lines:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            out.error(number, "json", "invalid_json", f"invalid JSON at column {e.colno}: {e.msg}")
            continue
        except RecursionError:
            out.error(number, "json", "invalid_json", "JSON nested too deeply")
            continue
        _convert(record, format, number, out)


def _read_json_array(text: str, format: Format, out: _Collector) -> None:
    """Read a JSON array, giving each element the line on which it starts."""
    decoder = json.JSONDecoder()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        out.error(e.lineno, "json", "invalid_json", f"invalid JSON at column {e.colno}: {e.msg}")
        return
    except RecursionError:
        out.error(0, "json", "invalid_json", "JSON nested too deeply")
        return
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        record, end = decoder.raw_decode(text, pos)
        first = text.count("\n", 0, pos) + 1
        if not out.undecodable(first, first + text.count("\n", pos, end)):
            _convert(record, format, first, out)
        pos = end


def _convert(record: Any, format: Format, line: int, out: _Collector) -> None:
    if not isinstance(record, dict):
        out.error(line, "record", "data_type", f"expected a JSON object, got {type(record).__name__}")
        return
    tag = record.get("source")
    if tag is not None and (not isinstance(tag, str) or not tag.strip()):
        out.error(
            line, "source", "data_type", f"source must be a non-empty string naming a manifest source, got {tag!r}"
        )
        return
    out.source = tag
    if format == "alpaca":
        _from_alpaca(record, line, out)
    elif format == "completion":
        _from_completion(record, line, out)
    else:
        _from_chat(record, line, out)


def _from_chat(record: dict[str, Any], line: int, out: _Collector) -> None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        out.error(
            line,
            "messages",
            "missing_messages_list",
            'expected "messages": a non-empty list of {"role": ..., "content": ...}',
        )
        return
    parsed: list[Message] = []
    ok = True
    for i, m in enumerate(messages):
        fld = f"messages[{i}]"
        if not isinstance(m, dict):
            out.error(line, fld, "data_type", f"expected an object, got {type(m).__name__}")
            ok = False
            continue
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            out.error(line, fld, "message_missing_key", f"missing {' and '.join(map(repr, missing))}")
            ok = False
            continue
        unknown = sorted(set(m) - set(CHAT_MESSAGE_KEYS))
        if unknown:
            out.error(
                line,
                fld,
                "message_unrecognized_key",
                f"unrecognized key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(CHAT_MESSAGE_KEYS)}",
            )
            ok = False
        role = m["role"]
        if role not in CHAT_ROLES:
            out.error(
                line,
                f"{fld}.role",
                "unrecognized_role",
                f"role {role!r} is not one of {', '.join(CHAT_ROLES)}",
            )
            ok = False
            continue
        content = m["content"]
        if not isinstance(content, str) or not content.strip():
            out.error(line, f"{fld}.content", "missing_content", "content must be a non-empty string")
            ok = False
            continue
        weight = m.get("weight", 1)
        if "weight" in m and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            out.error(
                line,
                f"{fld}.weight",
                "invalid_weight",
                f"weight must be 0 or 1 and only on assistant messages, got {weight!r} on a {role} message",
            )
            ok = False
            continue
        parsed.append(Message(role, content, int(weight)))
    if not ok:
        return
    _finish(parsed, line, out)


def _finish(parsed: list[Message], line: int, out: _Collector) -> None:
    """Check the order of turns and keep the example if it can be trained on."""
    if not any(m.role == "assistant" for m in parsed):
        out.error(line, "messages", "example_missing_assistant_message", "no assistant message to learn from")
        return
    if all(m.weight == 0 for m in parsed if m.role == "assistant"):
        out.error(line, "messages", "no_trainable_message", "every assistant message has weight 0")
        return
    for i, m in enumerate(parsed):
        if m.role == "system" and i != 0:
            out.error(line, f"messages[{i}].role", "misplaced_system", "a system message may only come first")
            return
    out.result.examples.append(Example(tuple(parsed), out.file, line, out.source))


def _text_field(record: dict[str, Any], key: str, line: int, out: _Collector, required: bool) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            out.error(line, key, "missing_content", f"missing {key!r} (a non-empty string)")
        return None
    if not isinstance(value, str):
        out.error(line, key, "data_type", f"{key!r} must be a string, got {type(value).__name__}")
        return None
    if required and not value.strip():
        out.error(line, key, "missing_content", f"{key!r} is empty")
        return None
    return value


def _unknown_keys(record: dict[str, Any], allowed: tuple[str, ...], line: int, out: _Collector) -> bool:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        out.error(
            line,
            "record",
            "unrecognized_key",
            f"unrecognized key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
        )
    return bool(unknown)


def _from_alpaca(record: dict[str, Any], line: int, out: _Collector) -> None:
    bad = _unknown_keys(record, ALPACA_KEYS, line, out)
    instruction = _text_field(record, "instruction", line, out, True)
    extra = _text_field(record, "input", line, out, False)
    output = _text_field(record, "output", line, out, True)
    system = _text_field(record, "system", line, out, False)
    if bad or instruction is None or output is None:
        return
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [Message("system", system)] if system and system.strip() else []
    _finish([*messages, Message("user", user), Message("assistant", output)], line, out)


def _from_completion(record: dict[str, Any], line: int, out: _Collector) -> None:
    bad = _unknown_keys(record, COMPLETION_KEYS, line, out)
    prompt = _text_field(record, "prompt", line, out, True)
    completion = _text_field(record, "completion", line, out, True)
    if bad or prompt is None or completion is None:
        return
    _finish([Message("user", prompt), Message("assistant", completion)], line, out)


def _read_csv(text: str, columns: dict[str, str], out: _Collector) -> None:
    csv.field_size_limit(1 << 27)  # long documents are fine; the context-length check comes later
    try:
        _read_csv_rows(text, columns, out)
    except csv.Error as e:
        out.error(0, "csv", "invalid_csv", f"cannot parse the CSV: {e}")


def _read_csv_rows(text: str, columns: dict[str, str], out: _Collector) -> None:
    # csv.reader rather than DictReader: its line_num before and after a row gives the lines the row
    # spans, so a quoted field over several lines is reported at the line where its row starts
    reader = csv.reader(io.StringIO(text, newline=""))
    headers = next(reader, [])
    bad_fields = sorted(set(columns) - set(CSV_FIELDS))
    if bad_fields:
        out.error(
            0,
            "columns",
            "unknown_field",
            f"cannot map to {', '.join(bad_fields)}; fields are {', '.join(CSV_FIELDS)}",
        )
        return
    mapping = {f: c for f, c in columns.items()}
    for f in CSV_FIELDS:
        if f not in mapping and f in headers:
            mapping[f] = f
    missing_cols = sorted(c for c in mapping.values() if c not in headers)
    if missing_cols:
        out.error(
            1,
            "header",
            "missing_column",
            f"no column named {', '.join(map(repr, missing_cols))}; the header has {', '.join(headers)}",
        )
        return
    if "user" in mapping or "assistant" in mapping:
        kind, needed = "chat", ("user", "assistant")
    elif "instruction" in mapping or "output" in mapping:
        kind, needed = "alpaca", ("instruction", "output")
    else:
        kind, needed = "completion", ("prompt", "completion")
    absent = [f for f in needed if f not in mapping]
    if absent:
        out.error(
            1,
            "header",
            "missing_column",
            f"no column for {', '.join(absent)}; name the columns {', '.join(needed)} or map them with "
            f"--columns {absent[0]}=COLUMN",
        )
        return
    last = reader.line_num
    for cells in reader:
        line, last = last + 1, reader.line_num
        if not cells or out.undecodable(line, last):
            continue  # a blank line, or a row already reported for its encoding
        row = dict(zip(headers, cells, strict=False))  # missing cells read as empty, extra ones are ignored
        values = {f: (row.get(c) or "") for f, c in mapping.items()}
        out.source = values.get("source") or None
        if kind == "chat":
            record: dict[str, Any] = {
                "messages": [
                    *([{"role": "system", "content": values["system"]}] if values.get("system") else []),
                    {"role": "user", "content": values["user"]},
                    {"role": "assistant", "content": values["assistant"]},
                ]
            }
            _from_chat(record, line, out)
        elif kind == "alpaca":
            keys = [k for k in ALPACA_KEYS if k in values and (values[k] or k in needed)]
            _from_alpaca({k: values[k] for k in keys}, line, out)
        else:
            _from_completion({"prompt": values["prompt"], "completion": values["completion"]}, line, out)


def parse_columns(spec: str | None) -> dict[str, str]:
    """Parse ``--columns user=question,assistant=answer`` into ``{field: column}``."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--columns: expected FIELD=COLUMN pairs separated by commas, got {part!r}")
        mapping[key.strip()] = value.strip()
    return mapping
