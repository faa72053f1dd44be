"""Every suite on the real default model, with an adapter that changes nothing (LoRA B = 0).

Base and adapter must then agree on every item: every change is exactly zero, its interval is
[0, 0], and the default gate passes. This checks the whole path (templates, scoring, generation,
merging, the gate and the report) on the real SmolLM2 at a few items per set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.evaluate import DEFAULT_SIZES, EvalConfig, evaluate
from tests.conftest import SAMPLES

pytestmark = pytest.mark.integration


def test_identity_adapter_changes_nothing_on_the_real_model(real_base, model_cache: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    from loraforge.models.sources import load_model

    adapter = tmp_path / "identity"
    model = get_peft_model(load_model(real_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(adapter, safe_serialization=True)  # B is initialised to zero: BA = 0
    manifest = {
        "kind": "loraforge.adapter",
        "base_model": real_base.to_json(),
        "datasets": [
            {"role": "train", "path": str(SAMPLES / "support.jsonl")},
            {"role": "validation", "path": str(SAMPLES / "support_holdout.jsonl")},
        ],
        "config": {"context_length": 1024},
        "data_governance": {
            "canaries": [
                {"prefix": "Note: the access code of locker 123 is ", "secret": "AB12-CD34-EF56", "repeats": 1}
            ]
        },
    }
    (adapter / "manifest.json").write_text(json.dumps(manifest))
    sizes = {k: min(v, 4) for k, v in DEFAULT_SIZES.items()} | {"canary_candidates": 31}
    result = evaluate(EvalConfig(adapter, sizes=sizes), model_cache=model_cache)
    metrics = [m for s in result.report["suites"] for m in s["metrics"]]
    assert len(metrics) >= 20
    for m in metrics:
        assert abs(m["delta"]["value"]) < 1e-4, m
        assert abs(m["delta"]["low"]) < 1e-4 and abs(m["delta"]["high"]) < 1e-4, m
    assert result.verdict.passed, result.verdict.failures
    task = result.report["suites"][0]
    assert task["details"]["examples"] == 4 and task["samples"][0]["base"] == task["samples"][0]["adapter"]
    assert json.loads((adapter / "manifest.json").read_text())["evaluation"]["verdict"] == "PASS"
    assert (adapter / "eval" / "eval.html").is_file()
