"""``loraforge export ollama`` and ``loraforge export vllm``: the files and commands each tool reads."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraforge.errors import ConfigError, ModelError
from loraforge.export.ollama import PROBES, _render_go_chatml, export_ollama, ollama_template
from loraforge.export.vllm import SERVE_OPTIONS, VLLM_MAX_LORA_RANKS, export_vllm, vllm_problems
from loraforge.files import sha256_file
from tests.serve.conftest import make_adapter


def test_the_ollama_directory_holds_a_modelfile_the_base_and_the_checked_adapter(
    tmp_path: Path, tiny_gguf: Path, adapter: Path
) -> None:
    out = tmp_path / "ollama"
    done = export_ollama(adapter, out, model_cache=tmp_path / "c", base_gguf=tiny_gguf)
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "adapter.gguf",
        "adapter.gguf.manifest.json",
        "base.gguf",
        "manifest.json",
    ]
    assert sha256_file(out / "base.gguf") == sha256_file(tiny_gguf)
    assert done.adapter.check.passed and done.model_name == "support"
    assert done.create_command == f"ollama create support -f {out / 'Modelfile'}"
    modelfile = (out / "Modelfile").read_text()
    lines = [line for line in modelfile.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ./base.gguf" and lines[1] == "ADAPTER ./adapter.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "{{ .System }}" in template and "{{- range .Messages }}" in template
    assert template.endswith("<|im_start|>assistant\n")
    # the default system prompt of the base model's template travels into the Go template
    assert "You are a helpful AI assistant named SmolLM" in template
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "loraforge.ollama_model" and manifest["commands"][0] == done.create_command
    with pytest.raises(ConfigError, match="cannot be an Ollama model name"):
        export_ollama(adapter, tmp_path / "o2", model_cache=tmp_path / "c", base_gguf=tiny_gguf, name="Bad\nFROM x")
    assert manifest["adapter_gguf"]["check"]["passed"] and manifest["files"]["Modelfile"] == sha256_file(
        out / "Modelfile"
    )


def test_the_go_template_renders_like_the_jinja_template(tokenizer: Any) -> None:
    from loraforge.data.templates import render

    template, stops = ollama_template(tokenizer)
    assert stops == ["<|im_end|>"]
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in PROBES:
        assert _render_go_chatml(messages, default) == render(tokenizer, messages, generation_prompt=True)
    # and the template text says what the mirror renders: .System first (or the default), then turns
    assert template.index("{{- if .System }}") < template.index(default) < template.index("{{- range .Messages }}")


def test_a_template_outside_the_chatml_family_is_refused(tokenizer: Any) -> None:
    class Llama3Like:
        eos_token = "<|eot_id|>"
        chat_template = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% endfor %}"

        def apply_chat_template(self, messages: Any, **_: Any) -> str:
            return "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
            )

    with pytest.raises(ModelError, match="not ChatML"):
        ollama_template(Llama3Like())


def test_the_vllm_directory_serves_the_adapters_with_vllms_options(
    tmp_path: Path, tiny_model_dir: Path, adapter: Path
) -> None:
    other = make_adapter(tiny_model_dir, tmp_path / "faq", seed=9, r=16, targets=["q_proj", "v_proj"])
    out = tmp_path / "vllm"
    done = export_vllm({"support": adapter, "faq": other}, out, model_cache=tmp_path / "c")
    assert done.max_lora_rank == 16 and done.max_lora_rank in VLLM_MAX_LORA_RANKS
    script = (out / "serve.sh").read_text()
    assert (out / "serve.sh").stat().st_mode & 0o777 == 0o700  # runnable by its owner, as printed
    command = shlex.split(script.splitlines()[-1])
    assert command[:4] == ["exec", "vllm", "serve", "base"] and command[-1] == "$@"
    options = [c for c in command if c.startswith("--")]
    assert set(options) <= set(SERVE_OPTIONS)  # only options vLLM documents for serving LoRA adapters
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--max-loras") + 1] == "2"
    modules = command[command.index("--lora-modules") + 1 : -1]
    assert modules == ["support=adapters/support", "faq=adapters/faq"]
    for module in modules:
        name, path = module.split("=")
        config = json.loads((out / path / "adapter_config.json").read_text())
        assert config["r"] <= done.max_lora_rank and not vllm_problems(config, "LlamaForCausalLM")
        assert sha256_file(out / path / "adapter_model.safetensors") == sha256_file(
            {"support": adapter, "faq": other}[name] / "adapter_model.safetensors"
        )
    base_config = json.loads((out / "base" / "config.json").read_text())
    assert base_config["architectures"] == ["LlamaForCausalLM"] and list((out / "base").glob("*.safetensors"))
    assert (out / "base" / "tokenizer.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == done.command and set(manifest["adapters"]) == {"support", "faq"}


def test_what_vllm_would_refuse_is_named_before_anything_is_written(
    tmp_path: Path, tiny_model_dir: Path, adapter: Path
) -> None:
    base = json.loads((adapter / "adapter_config.json").read_text())
    assert vllm_problems(base, "LlamaForCausalLM") == []
    cases = {
        "use_dora": (True, "DoRA"),
        "modules_to_save": (["lm_head"], "trains whole modules"),
        "rank_pattern": ({"q_proj": 4}, "one r and lora_alpha"),
        "r": (1024, "outside vLLM's 1…512"),
        "target_modules": (["q_proj", "embed_tokens"], "it adapts embed_tokens"),
    }
    for key, (value, message) in cases.items():
        problems = vllm_problems(base | {key: value}, "LlamaForCausalLM")
        assert len(problems) == 1 and message in problems[0], (key, problems)
    assert "not one of the architectures" in vllm_problems(base, "FalconForCausalLM")[0]

    dora = tmp_path / "dora"
    dora.mkdir()
    for item in adapter.iterdir():
        (dora / item.name).write_bytes(item.read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps(base | {"use_dora": True}))
    out = tmp_path / "vllm"
    with pytest.raises(ModelError, match="dora: it is a DoRA adapter, which vLLM does not support"):
        export_vllm({"support": adapter, "dora": dora}, out, model_cache=tmp_path / "c")
    assert not out.exists()
    with pytest.raises(ConfigError, match="at least one adapter"):
        export_vllm({}, out, model_cache=tmp_path / "c")


def test_the_commands(tmp_path: Path, tiny_gguf: Path, adapter: Path) -> None:
    home = ["--home", str(tmp_path / "home")]
    run = [sys.executable, "-m", "loraforge", "export"]
    ollama = subprocess.run(
        [*run, "ollama", "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--base-gguf", str(tiny_gguf), *home],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ollama.returncode == 0, ollama.stderr
    assert "ollama create support -f" in ollama.stdout and "ollama run support" in ollama.stdout
    vllm = subprocess.run(
        [*run, "vllm", "--adapters", f"help={adapter}", "--out", str(tmp_path / "v"), *home],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert vllm.returncode == 0, vllm.stderr
    assert "vllm serve base" in vllm.stdout and "--lora-modules help=adapters/help" in vllm.stdout
    missing = subprocess.run(
        [*run, "vllm", "--adapters", "nosuch", "--out", str(tmp_path / "w"), *home],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        missing.returncode == 1
        and "'nosuch' is neither an adapter directory nor a registered adapter" in missing.stderr
    )
