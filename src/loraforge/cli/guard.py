"""``loraforge guard …``: the prompt-injection detector from the command line.

``check`` scores one text and shows why; ``scan`` reads JSON lines with a ``text`` field and
writes one JSON line per input, in input order, for auditing prompt logs in bulk; ``train``
reproduces the shipped weights (or trains on a company's own examples too).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from loraforge.cli.output import console, err_console
from loraforge.errors import DataError

guard_app = typer.Typer(help="Guardrails: the prompt-injection and jailbreak detector.", no_args_is_help=True)
Threshold = Annotated[
    float | None, typer.Option(help="Flag at or above this score (default: the model's own threshold).")
]
Weights = Annotated[
    Path | None, typer.Option(exists=True, dir_okay=False, help="A detector trained by `loraforge guard train` (JSON).")
]


def _detector(weights: Path | None, threshold: float | None):  # type: ignore[no-untyped-def]
    from loraforge.guard.classifier import LogisticModel
    from loraforge.guard.injection import InjectionDetector

    return InjectionDetector(LogisticModel.load(weights) if weights else None, threshold=threshold)


@guard_app.command("check")
def check(
    text: Annotated[str, typer.Argument(help="The text to check (a prompt, a document, a tool's output).")],
    threshold: Threshold = None,
    weights: Weights = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score one text for prompt injection and jailbreaks, and show what the score rests on."""
    verdict = _detector(weights, threshold).check(text)
    if as_json:
        print(json.dumps(verdict.as_dict()))
        return
    style = "red" if verdict.flagged else "green"
    console.print(
        f"injection: [{style}]{verdict.score:.3f}[/] (threshold {verdict.threshold:.2f}) → "
        f"[{style}]{'FLAGGED' if verdict.flagged else 'ok'}[/]"
    )
    for hit in verdict.rules:
        where = "" if hit.view == 0 else f" (in the {verdict.decoded[hit.view - 1]} it decodes to)"
        console.print(f"  rule {escape(hit.rule)} ({hit.weight:.2f}){where}")
    if verdict.decoded:
        console.print(f"  decoded: {', '.join(verdict.decoded)}")
    if verdict.windows > 1:
        console.print(f"  scored in {verdict.windows} windows; the highest counts")


@guard_app.command("scan")
def scan(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            help="JSON lines, each with a `text` field (and optionally `role`).",
        ),
    ],
    threshold: Threshold = None,
    weights: Weights = None,
    batch: Annotated[int, typer.Option(min=1, help="Lines scored together.")] = 64,
) -> None:
    """Score every line of a prompt log; one JSON line per input on stdout, in input order."""
    detector = _detector(weights, threshold)
    texts: list[tuple[int, str]] = []
    started, count, flagged = time.perf_counter(), 0, 0

    def flush() -> None:
        nonlocal count, flagged
        verdicts = detector.check_many([t for _, t in texts])
        for (line, _), verdict in zip(texts, verdicts, strict=True):
            out = {"line": line, **verdict.as_dict()}
            out["action"] = "flag" if verdict.flagged else "allow"
            out["categories"] = ["prompt_injection"] if verdict.flagged else []
            sys.stdout.write(json.dumps(out) + "\n")
            flagged += verdict.flagged
        count += len(texts)
        texts.clear()

    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{file}:{number}: {e}; each line must be a JSON object with a text field") from e
            texts.append((number, text))
            if len(texts) >= batch:
                flush()
    if texts:
        flush()
    seconds = time.perf_counter() - started
    err_console.print(f"{count} lines, {flagged} flagged, {count / max(seconds, 1e-9) * 60:.0f} lines a minute")


@guard_app.command("train")
def train(
    out: Annotated[Path, typer.Option(help="Where to write the detector (JSON).")] = Path("injection.json"),
    extra: Annotated[
        list[Path] | None,
        typer.Option(exists=True, dir_okay=False, help="JSON lines of your own examples: text, label (1: an attack)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="The same seed gives the same weights.")] = 0,
    limit: Annotated[int | None, typer.Option(help="At most this many examples a split (a quick trial).")] = None,
) -> None:
    """Train the injection detector on the shipped examples (and yours); print its held-out figures."""
    from loraforge.guard.training import train as run

    meta = run(out, extra=extra or [], seed=seed, limit=limit, progress=lambda m: err_console.print(escape(m)))
    held = meta["held_out"]
    console.print(
        f"wrote {escape(str(out))}: held-out balanced accuracy {held['balanced_accuracy']:.3f}, precision "
        f"{held['precision']:.3f}, recall {held['recall']:.3f}, hard-negative false positives "
        f"{held['hard_negative_fpr']:.1%} on {held['items']} examples it never saw"
    )
