"""``loraforge export vllm``: a directory from which vLLM serves the base model and the chosen
adapters with multi-LoRA batching, as loraforge does: the base model (a Hugging Face directory, as
vLLM loads it), each adapter's PEFT files, and ``serve.sh`` with the ``vllm serve`` command.

Before anything is written, every adapter is checked against what vLLM's LoRA support accepts
(``vllm/lora/peft_helper.py`` and ``vllm/config/lora.py``): no DoRA, no ``modules_to_save``, no
LoRA bias, one rank and alpha for the whole adapter (vLLM reads ``r`` and ``lora_alpha`` only, so
rank or alpha patterns would be served at the wrong scale), a rank vLLM supports, target modules
that vLLM's model classes adapt, and one base model for all of them.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError, ModelError
from loraforge.files import atomic_directory, sha256_file, write_text_atomic
from loraforge.models.manifest import PEFT_FILES, read_manifest
from loraforge.models.sources import resolve_base_model

KIND = "loraforge.vllm_deployment"
# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Architectures whose vLLM model classes implement SupportsLoRA, with the projections they adapt
# (vLLM packs q/k/v into qkv_proj and gate/up into gate_up_proj and accepts adapters on the parts).
LINEAR = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_LORA_ARCHITECTURES = {
    "LlamaForCausalLM": LINEAR,
    "MistralForCausalLM": LINEAR,
    "Qwen2ForCausalLM": LINEAR,
    "Qwen3ForCausalLM": LINEAR,
    "GemmaForCausalLM": LINEAR,
    "Gemma2ForCausalLM": LINEAR,
}
SERVE_OPTIONS = ("--served-model-name", "--enable-lora", "--max-lora-rank", "--max-loras", "--lora-modules")


@dataclass(frozen=True)
class VllmExport:
    out: Path
    command: list[str]  # the vllm serve command, paths relative to ``out``
    max_lora_rank: int


def vllm_problems(adapter_config: dict[str, Any], architecture: str) -> list[str]:
    """What in one PEFT ``adapter_config.json`` vLLM would refuse or serve wrongly."""
    problems = []
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(f"it is a {adapter_config.get('peft_type')} adapter; vLLM serves LoRA adapters only")
    if adapter_config.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM does not support (export it merged instead)")
    if adapter_config.get("modules_to_save"):
        problems.append(f"it trains whole modules ({', '.join(adapter_config['modules_to_save'])}); vLLM needs none")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("it has bias terms, which vLLM's LoRA layers do not apply")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(pattern):
            problems.append(f"it sets {pattern}; vLLM reads one r and lora_alpha for the whole adapter")
    rank = int(adapter_config.get("r", 0))
    if not 0 < rank <= VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"its rank {rank} is outside vLLM's 1…{VLLM_MAX_LORA_RANKS[-1]}")
    supported = VLLM_LORA_ARCHITECTURES.get(architecture)
    if supported is None:
        known = ", ".join(VLLM_LORA_ARCHITECTURES)
        problems.append(f"its base is a {architecture}, not one of the architectures checked here ({known})")
    else:
        targets = adapter_config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        other = sorted({t.rsplit(".", 1)[-1] for t in targets} - supported)
        if other:
            problems.append(f"it adapts {', '.join(other)}; vLLM adapts {', '.join(sorted(supported))}")
    return problems


def export_vllm(
    adapters: dict[str, Path], out: Path, *, model_cache: Path, max_loras: int | None = None, replace: bool = False
) -> VllmExport:
    """Write a vLLM deployment of ``adapters`` (served name → PEFT directory) at ``out``.

    Raises:
        ConfigError: no adapters, a bad name, or ``out`` exists (without ``replace``).
        ModelError: an adapter vLLM would refuse (every problem of every adapter is listed), or
            adapters of different base models.
    """
    if not adapters:
        raise ConfigError("give at least one adapter (--adapters NAME_OR_DIR …)")
    if out.exists() and not replace:
        raise ConfigError(f"{out} already exists; choose another --out or pass --replace")
    manifests = {name: read_manifest(path) for name, path in adapters.items()}
    bases = {(m.base_model.name, m.base_model.sha256) for m in manifests.values()}
    if len(bases) > 1:
        listed = "; ".join(f"{n}: {m.base_model.name} ({m.base_model.sha256[:12]}…)" for n, m in manifests.items())
        raise ModelError(f"one vLLM server has one base model, but these adapters have several: {listed}")
    base_name, base_sha = bases.pop()
    base = resolve_base_model(base_name, model_cache)
    if base.sha256 != base_sha:
        raise ModelError(f"the installed {base_name} hashes to {base.sha256[:12]}…, the adapters' to {base_sha[:12]}…")
    config = json.loads((base.path / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    configs = {name: json.loads((path / "adapter_config.json").read_text()) for name, path in adapters.items()}
    problems = [f"{name}: {p}" for name, c in configs.items() for p in vllm_problems(c, architecture)]
    if problems:
        raise ModelError("vLLM cannot serve these adapters as trained: " + "; ".join(problems))
    top = max(int(c["r"]) for c in configs.values())
    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= top)
    served = base.model_id
    command = ["vllm", "serve", "base", "--served-model-name", served, "--enable-lora"]
    command += ["--max-lora-rank", str(max_rank), "--max-loras", str(max_loras or len(adapters))]
    command += ["--lora-modules", *(f"{name}=adapters/{name}" for name in adapters)]
    with atomic_directory(out, replace=replace) as tmp:
        shutil.copytree(base.path, tmp / "base", ignore=shutil.ignore_patterns("loraforge_source.json", ".*"))
        for name, path in adapters.items():
            (tmp / "adapters" / name).mkdir(parents=True)
            for file in (*PEFT_FILES, "manifest.json"):
                shutil.copyfile(path / file, tmp / "adapters" / name / file)
        script = (
            "#!/bin/sh\n"
            "# Serve the base model and its LoRA adapters with vLLM (a GPU machine with `pip install vllm`).\n"
            "# Clients use the OpenAI API at http://HOST:8000/v1 with model = an adapter's name.\n"
            'cd "$(dirname "$0")" || exit 1\n'
            f'exec {shlex.join(command)} "$@"\n'
        )
        write_text_atomic(tmp / "serve.sh", script)
        record = {
            "kind": KIND,
            "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command,
            "base_model": base.to_json() | {"path": "base", "architecture": architecture},
            "adapters": {
                name: {
                    "rank": int(configs[name]["r"]),
                    "lora_alpha": configs[name].get("lora_alpha"),
                    "target_modules": configs[name].get("target_modules"),
                    "lineage": manifests[name].lineage(),
                    "files": {f: sha256_file(adapters[name] / f) for f in PEFT_FILES},
                }
                for name in adapters
            },
        }
        write_text_atomic(tmp / "manifest.json", json.dumps(record, indent=2))
    (out / "serve.sh").chmod(0o700)  # the directory's files are made private (0600) as it is renamed
    return VllmExport(out, command, max_rank)
