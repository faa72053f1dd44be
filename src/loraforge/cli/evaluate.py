"""``loraforge eval``: its flags are the fields of ``EvalConfig`` (see :mod:`loraforge.cli.options`),
also settable in a YAML file (``--config``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from loraforge.cli.options import EVAL_FLAGS, ConfigFlags, Home, config_flags
from loraforge.cli.output import console, err_console, show_evaluation
from loraforge.errors import ConfigError


def eval_config_values(config: Path | None, flags: ConfigFlags, suites: str | None) -> dict[str, Any]:
    """``EvalConfig`` keyword arguments from the YAML file (optional) and the flags; a flag wins.

    Raises:
        ConfigError: the YAML file is unreadable, has unknown keys or values of the wrong type.
    """
    from loraforge.configfile import read_config_file
    from loraforge.evaluate import EvalConfig, parse_suites

    values = read_config_file(config, EvalConfig) if config is not None else {}
    for f in dataclasses.fields(EvalConfig):  # the YAML gives paths as text
        if str(f.type).startswith("Path") and isinstance(values.get(f.name), str):
            values[f.name] = Path(values[f.name]).expanduser()
    if isinstance(values.get("suites"), str):
        values["suites"] = parse_suites(values["suites"])
    if "sizes" in values and not isinstance(values["sizes"], dict):
        raise ConfigError(f"{config}: sizes: expected a mapping of set: items, got {values['sizes']!r}")
    values.update(flags)
    if suites is not None:
        values["suites"] = parse_suites(suites)
    return values


@config_flags(EVAL_FLAGS)
def eval_adapter(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML file; any option below, and `sizes` (items per set), can be set in it."),
    ] = None,
    *,
    flags: ConfigFlags,
    suites: Annotated[
        str | None,
        typer.Option(help="Comma-separated: task,regression,bias,truthfulness,safety,memorization (default: all)."),
    ] = None,
    max_items: Annotated[int | None, typer.Option(help="Cap every subset at N items (a quick look).")] = None,
    home: Home = None,
) -> None:
    """Evaluate an adapter against its base model and apply the release gate.

    Exit 0 the gate passed, 3 it failed, 4 it cannot decide (an interval crosses a threshold) and the
    policy blocks undecided rules, 1 an error.

    Any option can also be set in a YAML file given with --config, under the name of its field
    (adapter, suites, policy for --gate, report, data, sizes, seed, ...); a flag given here wins over
    the file.
    """
    from loraforge.evaluate import DEFAULT_SIZES, EvalConfig, evaluate
    from loraforge.home import model_cache_dir

    if max_items is not None and max_items < 1:
        raise ConfigError(f"--max-items must be >= 1, got {max_items}")
    values = eval_config_values(config, flags, suites)
    if "adapter" not in values:
        if config is None:  # the usage error it was when --adapter was required
            ctx.fail("Missing option '--adapter'.")
        raise ConfigError(f"no adapter: pass --adapter DIR or set `adapter:` in {config}")
    if max_items:
        values["sizes"] = {k: min(v, max_items) for k, v in {**DEFAULT_SIZES, **values.get("sizes", {})}.items()}
    result = evaluate(
        EvalConfig(**values),
        model_cache=model_cache_dir(home),
        progress=lambda msg: err_console.print(f"[dim]{escape(msg)}[/]"),
    )
    show_evaluation(console, result)
    raise typer.Exit(result.verdict.exit_status)
