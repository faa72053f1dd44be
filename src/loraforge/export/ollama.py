"""``loraforge export ollama``: a directory Ollama builds a model from — the base GGUF, the adapter
as a llama.cpp LoRA GGUF, and a ``Modelfile`` (``FROM`` the base, ``ADAPTER`` the LoRA, the chat
template in Ollama's Go template syntax, the stop tokens) — plus the ``ollama create`` command.

Ollama's templates are Go templates, not the Jinja of Hugging Face tokenizers, so the chat template
is translated. The translation is checked before anything is written: the Go template's meaning is
rendered here for a set of conversations (with and without a system message, several turns) and
must give exactly what the base model's own Jinja template gives. Templates of the ChatML family
(``<|im_start|>role\\ncontent<|im_end|>``, the default model's) are translated; others are refused
with the reason.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import ModelError
from loraforge.export.gguf import GgufExport, export_gguf, manifest_path
from loraforge.files import atomic_directory, sha256_file, write_text_atomic
from loraforge.models.manifest import read_manifest
from loraforge.models.sources import load_tokenizer, resolve_base_model

KIND = "loraforge.ollama_model"
OLLAMA_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}(:[a-z0-9][a-z0-9._-]{0,79})?")
START, END = "<|im_start|>", "<|im_end|>"
# Conversations the translated template must render exactly as the Jinja template does.
PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Where is my order?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Return a bike, please.\nIt is blue."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
)


@dataclass(frozen=True)
class OllamaExport:
    out: Path
    model_name: str
    adapter: GgufExport
    create_command: str


def ollama_template(tokenizer: Any) -> tuple[str, list[str]]:
    """The base model's chat template as an Ollama Go template, and the stop strings.

    Raises:
        ModelError: the template is not of the ChatML family, or the translation does not render
            the probe conversations exactly as the Jinja template does.
    """
    from loraforge.data.templates import render

    jinja = [render(tokenizer, messages, generation_prompt=True) for messages in PROBES]
    if START not in jinja[0] or END not in jinja[0]:
        raise ModelError(
            "the base model's chat template is not ChatML (<|im_start|>…<|im_end|>), the family this export "
            "translates to Ollama's Go templates; write the Modelfile's TEMPLATE by hand from "
            "tokenizer_config.json's chat_template, and use `loraforge export gguf --adapter-only` for the adapter"
        )
    default = re.match(rf"{re.escape(START)}system\n(.*?){re.escape(END)}\n", jinja[0], re.S)
    default_system = default.group(1) if default else None
    for messages, want in zip(PROBES, jinja, strict=True):
        got = _render_go_chatml(messages, default_system)
        if got != want:
            raise ModelError(
                "the Ollama template translated from the base model's chat template renders a conversation "
                f"differently ({got!r} against {want!r}); write the Modelfile's TEMPLATE by hand"
            )
    fallback = (
        "" if default_system is None else "{{ else }}" + START + "system\n" + _go_literal(default_system) + END + "\n"
    )
    system = "{{- if .System }}" + START + "system\n{{ .System }}" + END + "\n" + fallback + "{{ end }}"
    turns = (
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}" + START + "user\n{{ .Content }}" + END + "\n"
        "{{ else if eq .Role \"assistant\" }}" + START + "assistant\n{{ .Content }}" + END + "\n"
        "{{ end }}"
        "{{- end }}" + START + "assistant\n"
    )  # fmt: skip
    stops = [END] + [t for t in (tokenizer.eos_token,) if t and t != END]
    if '"""' in system or any('"' in stop or "\n" in stop for stop in stops):
        raise ModelError(
            "the chat template's default system prompt or stop tokens hold quotes a Modelfile cannot carry"
        )
    return system + turns, stops


def _go_literal(text: str) -> str:
    """``text`` where a Go template would print it: ``{{`` cannot appear raw."""
    return text.replace("{{", '{{ "{{" }}')


def _render_go_chatml(messages: list[dict[str, str]], default_system: str | None) -> str:
    """What the template :func:`ollama_template` writes renders to in Ollama for ``messages``: the
    system messages as ``.System`` (Ollama joins several with a blank line; or the default), user and
    assistant turns from ``.Messages``, and the generation prompt. (Ollama also merges consecutive
    messages of one role; the probes, like chat clients, alternate.)"""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = "\n\n".join(systems) if systems else default_system
    out = f"{START}system\n{system}{END}\n" if system is not None else ""
    for m in messages:
        if m["role"] in ("user", "assistant"):
            out += f"{START}{m['role']}\n{m['content']}{END}\n"
    return out + f"{START}assistant\n"


def _model_name(adapter: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", adapter.resolve().name.lower()).strip("-._")
    return name or "loraforge-adapter"


def export_ollama(
    adapter: Path,
    out: Path,
    *,
    model_cache: Path,
    type: str = "f16",
    base_gguf: Path | None = None,
    name: str | None = None,
    replace: bool = False,
) -> OllamaExport:
    """Write an Ollama model directory for ``adapter`` at ``out`` (see the module's docstring).

    Raises:
        ConfigError: ``out`` exists (without ``replace``), an unknown type, or no base GGUF.
        ModelError: what :func:`~loraforge.export.gguf.export_gguf` refuses with ``--adapter-only``,
            or a chat template that cannot be translated.
    """
    from loraforge.errors import ConfigError

    if out.exists() and not replace:
        raise ConfigError(f"{out} already exists; choose another --out or pass --replace")
    manifest = read_manifest(adapter)
    tokenizer = load_tokenizer(resolve_base_model(manifest.base_model.name, model_cache))
    template, stops = ollama_template(tokenizer)  # before the long work: a template we cannot write stops here
    model_name = name or _model_name(adapter)
    if not OLLAMA_NAME.fullmatch(model_name):
        raise ConfigError(
            f"{model_name!r} cannot be an Ollama model name: use lowercase letters, digits, '-', '_' and '.', "
            "optionally with a :tag"
        )
    with atomic_directory(out, replace=replace) as tmp:
        lora = export_gguf(
            adapter, tmp / "adapter.gguf", model_cache=model_cache, type=type, adapter_only=True, base_gguf=base_gguf
        )
        shutil.copyfile(lora.base_gguf, tmp / "base.gguf")
        lines = [
            f"# {model_name}: a loraforge adapter on {manifest.base_model.name}. Build it with:",
            f"#   ollama create {model_name} -f Modelfile",
            "FROM ./base.gguf",
            "ADAPTER ./adapter.gguf",
            f'TEMPLATE """{template}"""',
            *(f'PARAMETER stop "{s}"' for s in stops),
        ]
        write_text_atomic(tmp / "Modelfile", "\n".join(lines) + "\n")
        create = f"ollama create {model_name} -f {shlex.quote(str(out / 'Modelfile'))}"
        record = {
            "kind": KIND,
            "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_name": model_name,
            "commands": [create, f"ollama run {model_name}"],
            "adapter_gguf": json.loads(manifest_path(tmp / "adapter.gguf").read_text()),
            "lineage": manifest.lineage(),
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        write_text_atomic(tmp / "manifest.json", json.dumps(record, indent=2))
    return OllamaExport(out, model_name, lora, create)
