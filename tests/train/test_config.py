"""Config parsing: YAML and flags, unknown keys, bad values, each with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import ConfigError
from loraforge.train.config import KNOWN_KEYS, TrainConfig, load_config


def test_yaml_sets_fields_and_flags_override(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: a.jsonl\noutput: out\nlora-r: 8\nlearning_rate: 0.0005\ntarget_modules: [q_proj, v_proj]\n")
    cfg = load_config(p, {"lora_r": 4, "epochs": None})
    assert (cfg.data, cfg.lora_r, cfg.learning_rate, cfg.target_modules) == (
        "a.jsonl",
        4,
        0.0005,
        ["q_proj", "v_proj"],
    )


def test_every_field_settable_in_yaml() -> None:
    assert {
        "data",
        "output",
        "validation",
        "base_model",
        "max_steps",
        "epochs",
        "lora_r",
        "lora_alpha",
        "seed",
        "resume",
    } <= set(KNOWN_KEYS)


def test_unknown_key_lists_known_ones_and_close_match(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, {})
    msg = str(e.value)
    assert "'lora_rank'" in msg and "did you mean 'lora_r'" in msg and "known keys:" in msg and "seq_len" in msg


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: a\nlora_r: [1,\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(p, {})


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("lora_r: eight\n", "lora_r: expected int"),
        ("use_dora: 1\n", "use_dora: expected bool"),
        ("[1, 2]\n", "expected a mapping"),
    ],
)
def test_wrong_types(tmp_path: Path, yaml_text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_config(p, {})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lora_r": 0}, "lora_r must be > 0"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"context_length": 4096, "seq_len": 1024}, "context_length must be in"),
        ({"validation_split": 0.7}, "validation_split"),
        ({"max_steps": 0}, "max_steps must be > 0"),
    ],
)
def test_invalid_values(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_missing_data_and_output() -> None:
    with pytest.raises(ConfigError, match="--data PATH"):
        TrainConfig().require_paths()


def test_yaml_scientific_notation_and_home_paths(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: ~/d.jsonl\noutput: o\nlearning_rate: 2e-4\ntarget_modules: q_proj, v_proj\n")
    cfg = load_config(p, {})
    assert cfg.learning_rate == 2e-4
    assert not cfg.data.startswith("~")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    p.write_text("epochs: .inf\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(p, {})
