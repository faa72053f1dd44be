"""Input drift: a profile of the sample's training prompts tells its held-out prompts from other domains.

The other-domain prompts here were written for this test and were not among the sets the
profile's features were chosen on (docs/monitoring.md lists those and their figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.data.drift import (
    EXPECTED,
    PROFILE_FILE,
    DriftWindow,
    alert_share,
    build_profile,
    prompt_texts,
    read_profile,
)
from loraforge.errors import ConfigError

SAMPLES = Path(__file__).parents[2] / "src" / "loraforge" / "samples"

OTHER_DOMAIN = [
    "How long should I roast a whole chicken at 200 degrees?",
    "What is the difference between baking soda and baking powder?",
    "Can you suggest a vegetarian lasagna recipe for eight people?",
    "Why does my sourdough starter smell like acetone?",
    "Which planets can be seen with the naked eye tonight?",
    "How far away is the Andromeda galaxy in light years?",
    "Explain why the sky looks blue during the day.",
    "What causes the northern lights?",
    "Who won the football world cup in 1998?",
    "How many players are on a cricket team?",
    "What are the rules of the offside trap in soccer?",
    "Recommend a training plan for my first marathon.",
    "When should I plant tulip bulbs in my garden?",
    "Why are the leaves of my tomato plants turning yellow?",
    "How often should I water a cactus in winter?",
    "What is a good fertilizer for roses?",
    "Write a Python function that reverses a linked list.",
    "What is the time complexity of quicksort in the worst case?",
    "How do I undo the last commit in git without losing changes?",
    "Explain the difference between a process and a thread.",
    "What were the main causes of the French Revolution?",
    "Who was the first emperor of Rome?",
    "Summarise the plot of Pride and Prejudice.",
    "What themes does Shakespeare explore in Macbeth?",
    "How do vaccines train the immune system?",
    "What is the normal resting heart rate for adults?",
    "Is it safe to take ibuprofen with coffee?",
    "How much sleep do teenagers need?",
    "What is the capital of Australia?",
    "Which river flows through Budapest?",
    "How do I calculate compound interest on a savings account?",
    "Should I pay off my mortgage early or invest in index funds?",
    "What is the difference between a Roth IRA and a traditional IRA?",
    "How do I file taxes as a freelancer?",
    "Translate 'good morning, how are you' into Portuguese.",
    "What is the subjunctive mood in Spanish grammar?",
    "How do I tune a guitar to drop D?",
    "What chords are in the key of E minor?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is the chemical formula of table salt?",
    "Balance this equation: hydrogen plus oxygen gives water.",
    "How does photosynthesis convert light into sugar?",
    "What is the boiling point of water on Mount Everest?",
    "How do I train my puppy to stop biting?",
    "What do hamsters eat besides seeds?",
]


def _prompts(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        out.append(prompt_texts((m["role"], m["content"]) for m in messages))
    return out


@pytest.fixture(scope="module")
def profile():  # type: ignore[no-untyped-def]
    return build_profile(_prompts(SAMPLES / "support.jsonl"))


def test_calibration_keeps_in_domain_prompts_familiar(profile) -> None:  # type: ignore[no-untyped-def]
    assert 0 < profile.line < 1 and profile.prompts == 220
    holdout = _prompts(SAMPLES / "support_holdout.jsonl")
    unfamiliar = sum(profile.unfamiliar(p) for p in holdout) / len(holdout)
    # by construction about 5% of new in-domain prompts cross the line
    assert unfamiliar <= alert_share(len(holdout)), unfamiliar


def test_other_domains_are_unfamiliar(profile) -> None:  # type: ignore[no-untyped-def]
    # measured: 16 of these 45 (36%) cross the line, against 0 of the 30 held-out support prompts
    share = sum(profile.unfamiliar(p) for p in OTHER_DOMAIN) / len(OTHER_DOMAIN)
    assert share > 0.3, share
    held = _prompts(SAMPLES / "support_holdout.jsonl")
    inside = [profile.novelty(p) for p in held]
    outside = [profile.novelty(p) for p in OTHER_DOMAIN]
    auc = sum((o > i) + 0.5 * (o == i) for o in outside for i in inside) / (len(inside) * len(outside))
    assert auc > 0.9, auc  # measured 0.947: a random other-domain prompt is more novel than a held-out one


def test_window_alerts_when_traffic_moves_and_clears_when_it_is_back(profile) -> None:  # type: ignore[no-untyped-def]
    held = _prompts(SAMPLES / "support_holdout.jsonl")
    window = DriftWindow(profile, size=30)
    for p in held[:29]:
        window.add(p)
    assert not window.alert  # never before the window is full
    window.add(held[29])
    assert not window.alert and window.share <= window.threshold
    for p in OTHER_DOMAIN[:30]:  # then users ask about something else
        window.add(p)
    assert window.alert, window.to_json()
    for p in held:
        window.add(p)
    assert not window.alert  # and it clears when traffic is back


def test_profile_round_trip_and_errors(tmp_path: Path, profile) -> None:  # type: ignore[no-untyped-def]
    profile.write(tmp_path)
    again = read_profile(tmp_path)
    assert again is not None and again.line == profile.line and again.seen == profile.seen
    assert read_profile(tmp_path / "none") is None
    stored = json.loads((tmp_path / PROFILE_FILE).read_text())
    assert "Brightpath" not in json.dumps(stored)  # hashes only, never the text
    (tmp_path / PROFILE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable input profile"):
        read_profile(tmp_path)
    with pytest.raises(ConfigError, match="at least 20"):
        build_profile(["hello there"] * 5)


def test_alert_share_is_three_sigma_above_the_expected_share() -> None:
    assert alert_share(50) == pytest.approx(EXPECTED + 3 * (EXPECTED * (1 - EXPECTED) / 50) ** 0.5)
    assert alert_share(1000) < alert_share(50)
