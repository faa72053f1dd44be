"""One preparation for training and for `data check`: the same licence rule and the same findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraforge.data.dedup import NEAR_DUPLICATE_THRESHOLD
from loraforge.data.licensing import LicenseError
from loraforge.data.prepare import check_data, prepare_data
from tests.conftest import chat


def _manifest(path: str, license_id: str) -> str:
    return f"sources:\n  - path: {path}\n    license: {license_id}\n    owner: Acme\n    personal_data: false\n"


MIT = _manifest("data.jsonl", "MIT")
DENIED = _manifest("data.jsonl", "LicenseRef-Proprietary")
OTHER_FILE = _manifest("other.jsonl", "MIT")  # covers none of data.jsonl's records

LICENCE_CASES = [
    # (name, manifest beside the data, allow_unlicensed, training goes ahead)
    ("licensed", MIT, False, True),
    ("no manifest", None, False, False),
    ("no manifest, allowed", None, True, True),
    ("records no source covers", OTHER_FILE, False, False),
    ("records no source covers, allowed", OTHER_FILE, True, True),
    ("denied, allowed or not", DENIED, True, False),
]


def _training_options(allow_unlicensed: bool) -> dict[str, Any]:
    return {
        "format": "auto",
        "columns": {},
        "max_length": 256,
        "overlong": "truncate",
        "validation_split": 0.25,
        "seed": 0,
        "pii": "report",
        "dedupe": "none",
        "threshold": NEAR_DUPLICATE_THRESHOLD,
        "canaries": 0,
        "canary_repeats": 1,
        "allow_secrets": False,
        "manifest": None,
        "policy": None,
        "allow_unlicensed": allow_unlicensed,
    }


@pytest.mark.parametrize(
    ("name", "manifest", "allow_unlicensed", "trains"), LICENCE_CASES, ids=[c[0] for c in LICENCE_CASES]
)
def test_train_and_data_check_apply_one_licence_rule(
    tmp_path: Path,
    write_jsonl,
    tokenizer,
    name: str,
    manifest: str | None,
    allow_unlicensed: bool,
    trains: bool,  # type: ignore[no-untyped-def]
) -> None:
    data = write_jsonl([chat(f"question {i} about bikes", f"answer {i}") for i in range(12)])
    if manifest is not None:
        (tmp_path / "data.manifest.yaml").write_text(manifest)
    checked = check_data(data, tokenizer, max_length=256, allow_unlicensed=allow_unlicensed)
    licence = [p for p in checked.report.problems if p.field == "licence"]
    assert checked.report.ok is trains
    assert all(p.severity == ("warning" if trains else "error") for p in licence)
    assert bool(licence) is (name != "licensed")
    if trains:
        prepared = prepare_data(str(data), None, tokenizer, **_training_options(allow_unlicensed))
        assert prepared.licensing["allow_unlicensed"] is allow_unlicensed
        assert (len(prepared.train), len(prepared.validation)) == (9, 3)
        assert [f["flag"] for f in prepared.flags] == (["allow_unlicensed"] if allow_unlicensed else [])
    else:
        with pytest.raises(LicenseError, match="training refused by the licence check"):
            prepare_data(str(data), None, tokenizer, **_training_options(allow_unlicensed))
