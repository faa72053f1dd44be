"""The datasheet: every section present, measured values filled, the rest marked for the owner."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.data.datasheet import TODO, build_datasheet, guess_language, write_datasheet
from loraforge.data.licensing import check_licensing
from loraforge.data.scan import scan_examples
from loraforge.data.validate import check_dataset
from tests.conftest import SAMPLES

SECTIONS = ["motivation", "composition", "collection", "preprocessing", "uses", "distribution", "maintenance"]


def test_datasheet_of_the_sample(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = SAMPLES / "support.jsonl"
    report = check_dataset(path, tokenizer)
    licensing = check_licensing([(path, report.examples)])
    _, scan = scan_examples(report.examples)
    sheet = build_datasheet(report, licensing, scan)
    assert list(sheet["sections"]) == SECTIONS
    comp = sheet["sections"]["composition"]
    assert comp["instances"]["value"].startswith("220 conversations")
    assert comp["languages"]["value"] == {"en": 220}
    assert comp["tokens"]["value"]["tokens"] == report.summary()["tokens"]
    assert sheet["sections"]["distribution"]["licences"] == {
        "value": ["CC0-1.0"],
        "source": "licence manifest support.manifest.yaml",
    }
    assert sheet["sections"]["uses"]["intended"]["source"] == TODO
    json_path, html_path = write_datasheet(sheet, tmp_path / "ds")
    assert json.loads(json_path.read_text())["title"] == "Datasheet: support.jsonl"
    html = html_path.read_text()
    assert html.startswith("<!doctype html>") and "for the owner to fill" in html and "data:image/png;base64," in html
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in html


def test_guess_language() -> None:
    assert guess_language("Where is my order? It was due on Monday and the tracking is not working.") == "en"
    assert guess_language("Wo ist meine Bestellung? Sie ist nicht angekommen und ich warte auf die Lieferung.") == "de"
    assert guess_language("¿Dónde está mi pedido? No ha llegado y el número de seguimiento no funciona.") == "es"
    assert guess_language("ok") == "und"
