"""The Prometheus rules and the Grafana dashboard in docs/ name only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from loraforge.serve.telemetry import Metrics

DOCS = Path(__file__).parents[2] / "docs"
NAME = re.compile(r"\bloraforge_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _exported() -> set[str]:
    """Every sample name the server's /metrics can carry (from its # TYPE lines)."""
    names = set()
    for line in Metrics().render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            if kind in ("histogram", "summary"):
                names.update({f"{name}_count", f"{name}_sum"} | ({f"{name}_bucket"} if kind == "histogram" else set()))
    return names


def _queries() -> list[str]:
    rules = yaml.safe_load((DOCS / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DOCS / "grafana" / "loraforge.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_metric_in_the_rules_and_dashboard_is_exported() -> None:
    exported = _exported()
    named = {n for expr in _queries() for n in NAME.findall(expr)}
    assert len(named) >= 12  # the checks look at something
    assert named - exported == set(), f"not exported by the server: {sorted(named - exported)}"


def test_the_rules_are_well_formed() -> None:
    rules = yaml.safe_load((DOCS / "prometheus" / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert rule["alert"].startswith("Loraforge") and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")")
    dashboard = json.loads((DOCS / "grafana" / "loraforge.json").read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
