"""Every format reads into the same chat examples; every problem is reported with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.data.formats import Message, load_dataset, parse_columns
from loraforge.errors import ConfigError


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


FORMAT_CASES = [
    (
        "chat",
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        [Message("user", "Hi"), Message("assistant", "Hello")],
    ),
    (
        "alpaca",
        "d.jsonl",
        json.dumps({"instruction": "Translate", "input": "chat", "output": "cat"}),
        [Message("user", "Translate\n\nchat"), Message("assistant", "cat")],
    ),
    (
        "alpaca",
        "d.json",
        json.dumps([{"instruction": "Say hi", "output": "hi"}], indent=2),
        [Message("user", "Say hi"), Message("assistant", "hi")],
    ),
    (
        "completion",
        "d.jsonl",
        json.dumps({"prompt": "2+2=", "completion": "4"}),
        [Message("user", "2+2="), Message("assistant", "4")],
    ),
    (
        "csv",
        "d.csv",
        'question,answer\n"Where, exactly?","Here"\n',
        [Message("user", "Where, exactly?"), Message("assistant", "Here")],
    ),
]


@pytest.mark.parametrize(("expected_format", "name", "text", "messages"), FORMAT_CASES)
def test_every_format_autodetected_into_chat_messages(
    tmp_path: Path, expected_format: str, name: str, text: str, messages: list[Message]
) -> None:
    columns = {"user": "question", "assistant": "answer"} if name.endswith(".csv") else None
    result = load_dataset(_write(tmp_path, name, text), columns=columns)
    assert result.problems == []
    assert result.format == expected_format
    assert list(result.examples[0].messages) == messages


def test_format_override_is_respected(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", json.dumps({"prompt": "a", "completion": "b"}))
    result = load_dataset(p, format="chat")
    assert [pr.code for pr in result.errors] == ["missing_messages_list"]


def test_csv_default_column_names_and_missing_column(tmp_path: Path) -> None:
    ok = load_dataset(_write(tmp_path, "a.csv", "prompt,completion\nq,a\n"))
    assert ok.examples and not ok.problems
    bad = load_dataset(_write(tmp_path, "b.csv", "q,a\nx,y\n"))
    assert bad.errors[0].code == "missing_column"
    assert "--columns" in bad.errors[0].message


ERROR_CASES = [
    ("data_type", '["not", "an", "object"]'),
    ("missing_messages_list", '{"msgs": []}'),
    ("message_missing_key", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'),
    (
        "message_unrecognized_key",
        '{"messages": [{"role": "user", "content": "x", "mood": 1}, {"role": "assistant", "content": "y"}]}',
    ),
    (
        "unrecognized_role",
        '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    ),
    (
        "missing_content",
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}',
    ),
    ("example_missing_assistant_message", '{"messages": [{"role": "user", "content": "x"}]}'),
    ("invalid_json", '{"messages": [}'),
    (
        "invalid_weight",
        '{"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}',
    ),
]


@pytest.mark.parametrize(("code", "line"), ERROR_CASES)
def test_each_error_class_names_file_line_and_field(tmp_path: Path, code: str, line: str) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = _write(tmp_path, "d.jsonl", f"{good}\n{line}\n{good}\n")
    result = load_dataset(path, format="chat")
    assert [p.code for p in result.errors] == [code]
    problem = result.errors[0]
    assert problem.line == 2
    assert str(problem).startswith(f"{path}:2: ")
    assert len(result.examples) == 2  # the good lines still parse


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "d.jsonl",
        "{bad\n" + '{"messages": 1}\n' + '{"messages": [{"role": "x", "content": "y"}]}\n',
    )
    result = load_dataset(path)
    assert [(p.line, p.code) for p in result.errors] == [
        (1, "invalid_json"),
        (2, "missing_messages_list"),
        (3, "unrecognized_role"),
    ]


def test_invalid_utf8_and_empty_file(tmp_path: Path) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    bad = _write(tmp_path, "u.jsonl", good.encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    result = load_dataset(bad)
    assert [(p.line, p.code) for p in result.errors] == [(2, "invalid_utf8")]
    assert len(result.examples) == 1
    empty = load_dataset(_write(tmp_path, "e.jsonl", "\n  \n"))
    assert [p.code for p in empty.errors] == ["empty_file"]
    missing = load_dataset(tmp_path / "nope.jsonl")
    assert [p.code for p in missing.errors] == ["file_not_found"]


def test_alpaca_json_array_lines_point_at_each_record(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "", "output": "d"}\n]\n'
    result = load_dataset(_write(tmp_path, "a.json", text))
    assert [(p.line, p.code) for p in result.errors] == [(3, "missing_content")]


def test_weights_parse_and_all_zero_is_refused(tmp_path: Path) -> None:
    rec = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "weight": 1},
        ]
    }
    ok = load_dataset(_write(tmp_path, "w.jsonl", json.dumps(rec)))
    assert [m.weight for m in ok.examples[0].messages] == [1, 0, 1, 1]
    rec["messages"][3]["weight"] = 0  # type: ignore[index]
    bad = load_dataset(_write(tmp_path, "z.jsonl", json.dumps(rec)))
    assert [p.code for p in bad.errors] == ["no_trainable_message"]


def test_parse_columns() -> None:
    assert parse_columns("user=q, assistant=a") == {"user": "q", "assistant": "a"}
    with pytest.raises(ConfigError, match="FIELD=COLUMN"):
        parse_columns("user")


def test_directory_long_csv_fields_and_deep_json(tmp_path: Path) -> None:
    assert [p.code for p in load_dataset(tmp_path).errors] == ["not_a_file"]
    long = "x" * 200_000
    ok = load_dataset(_write(tmp_path, "l.csv", f"prompt,completion\nq,{long}\n"))
    assert not ok.problems and ok.examples[0].messages[1].content == long
    deep = load_dataset(_write(tmp_path, "deep.jsonl", "[" * 100_000 + "\n"))
    assert [p.code for p in deep.errors] == ["invalid_json"]


# --- encodings and line endings: the real line, the byte within it, and every other line checked ---------------


def _chat_line(i: int, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]})


def _alpaca_line(i: int, answer: str) -> str:
    return json.dumps({"instruction": f"q{i}", "output": answer}) + ","


def _csv_line(i: int, answer: str) -> str:
    return f'"q{i}","{answer}"'


# (file name, lines before the records, one record on one line, lines after them)
LAYOUTS = [
    ("d.jsonl", [], _chat_line, []),
    ("d.json", ["["], _alpaca_line, ['{"instruction": "last", "output": "x"}]']),
    ("d.csv", ["user,assistant"], _csv_line, []),
]
ENDINGS = [("LF", "\n"), ("CRLF", "\r\n"), ("CR", "\r")]


@pytest.mark.parametrize(("name", "head", "record", "tail"), LAYOUTS)
@pytest.mark.parametrize(("ending", "newline"), ENDINGS)
def test_invalid_utf8_is_reported_at_its_real_line_and_the_rest_is_checked(
    tmp_path: Path, name: str, head: list[str], record, tail: list[str], ending: str, newline: str
) -> None:  # type: ignore[no-untyped-def]
    lines = list(head)
    while len(lines) < 35:
        n = len(lines) + 1  # the line this record will be on; the one on line 28 has an empty answer
        lines.append(record(n, "" if n == 28 else f"answer {n}"))
    lines += tail
    raw = [line.encode() for line in lines]
    raw[25] = raw[25].replace(b"answer", b"r\xe9ponse")  # line 26: an "é" saved as Latin-1
    offset = raw[25].index(b"\xe9") + 1
    result = load_dataset(_write(tmp_path, name, newline.encode().join(raw) + newline.encode()))
    assert [(p.line, p.code) for p in result.errors] == [(26, "invalid_utf8"), (28, "missing_content")], ending
    assert f"invalid UTF-8 at byte {offset} of the line (0xE9)" in result.errors[0].message
    records = range(len(head) + 1, len(lines) + 1)
    assert [ex.line for ex in result.examples] == [n for n in records if n not in (26, 28)]


@pytest.mark.parametrize(("ending", "newline"), ENDINGS)
def test_csv_record_over_several_lines_is_reported_where_it_starts(tmp_path: Path, ending: str, newline: str) -> None:
    rows = ["user,assistant", '"a question","an answer"', f'"a question{newline}over two lines",""', '"q","a"']
    result = load_dataset(_write(tmp_path, "m.csv", newline.join(rows).encode()))
    assert [(p.line, p.code) for p in result.errors] == [(3, "missing_content")], ending
    assert [ex.line for ex in result.examples] == [2, 5]


def test_utf16_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    text = _chat_line(1, "hello") + "\n"
    result = load_dataset(_write(tmp_path, "u16.jsonl", text.encode("utf-16")))
    assert [(p.line, p.code) for p in result.errors] == [(0, "invalid_utf8")]
    assert "UTF-16" in result.errors[0].message
