"""``loraforge export merged``: a directory plain transformers loads, equal to base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraforge.errors import ConfigError, ModelError
from loraforge.export import merged as merged_module
from loraforge.export.merged import export_merged
from loraforge.files import sha256_file


def _reference_logits(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits[0]


def test_the_merged_model_loads_in_plain_transformers_and_equals_the_adapter(
    tmp_path: Path, tiny_model_dir: Path, adapter: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    done = export_merged(adapter, out, model_cache=tmp_path / "cache")
    assert done.check.passed and done.check.max_abs_logit_diff < 1e-3 and done.check.top1_agreement == 1.0
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config  # no custom code: plain transformers classes
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tokenizer.chat_template  # the chat template travels with it
    ids = tokenizer("How do I return a bike?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
    want = _reference_logits(tiny_model_dir, adapter, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        assert (base(input_ids=ids).logits[0] - want).abs().max() > 1e-2  # the adapter does change the model

    manifest = json.loads((out / "manifest.json").read_text())
    adapter_manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["kind"] == "loraforge.merged_model" and manifest["dtype"] == "fp32"
    assert manifest["adapter"]["checksums"] == adapter_manifest["checksums"]
    assert manifest["lineage"]["base_model"]["sha256"] == adapter_manifest["base_model"]["sha256"]
    assert manifest["check"]["passed"] and manifest["check"]["positions"] == done.check.positions
    assert manifest["check"]["mean_abs_logit_diff"] < 1e-3 < manifest["check"]["adapter_effect"]
    assert manifest["check"]["mean_abs_diff_to_base"] == pytest.approx(manifest["check"]["adapter_effect"], rel=1e-3)
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest, name


def test_a_bf16_export_is_half_the_size_within_its_tolerance(tmp_path: Path, adapter: Path) -> None:
    full = export_merged(adapter, tmp_path / "fp32", model_cache=tmp_path / "cache")
    half = export_merged(adapter, tmp_path / "bf16", model_cache=tmp_path / "cache", dtype="bf16")
    assert half.check.passed and half.check.max_abs_logit_diff <= half.check.tolerance
    weights = {d: sum(p.stat().st_size for p in (tmp_path / d).glob("*.safetensors")) for d in ("fp32", "bf16")}
    assert weights["bf16"] < 0.6 * weights["fp32"]
    assert full.check.max_abs_logit_diff <= half.check.max_abs_logit_diff


def test_a_failed_check_leaves_nothing_and_bad_requests_are_refused(
    tmp_path: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    monkeypatch.setitem(merged_module.TOLERANCE, "fp32", 0.0)  # no export can be that exact
    with pytest.raises(ModelError, match=r"\(tolerance 0 for fp32\).*Nothing was written"):
        export_merged(adapter, out, model_cache=tmp_path / "cache")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    # a merge that loses the adapter fails even under a tolerance loose enough to let it through
    from peft.tuners.lora import LoraModel

    monkeypatch.setitem(merged_module.TOLERANCE, "fp32", 1e6)
    monkeypatch.setattr(LoraModel, "merge_and_unload", LoraModel.unload)
    with pytest.raises(ModelError, match=r"from the base model without the adapter"):
        export_merged(adapter, out, model_cache=tmp_path / "cache")
    assert not out.exists()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--dtype must be one of fp32, bf16, fp16"):
        export_merged(adapter, out, model_cache=tmp_path / "cache", dtype="int4")
    out.mkdir()
    with pytest.raises(ConfigError, match="already exists; choose another --out or pass --replace"):
        export_merged(adapter, out, model_cache=tmp_path / "cache")
    other = tmp_path / "other-base"
    other.mkdir()
    for item in adapter.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base_model"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="install the original base model"):
        export_merged(other, tmp_path / "never", model_cache=tmp_path / "cache")


def test_the_command(tmp_path: Path, adapter: Path) -> None:
    out = tmp_path / "merged"
    command = [sys.executable, "-m", "loraforge", "export", "merged", "--adapter", str(adapter), "--out", str(out)]
    command += ["--home", str(tmp_path / "home")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "top-1 agreement 100.0%" in done.stdout and (out / "config.json").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already exists" in again.stderr
