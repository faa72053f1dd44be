"""``loraforge export …``: an adapter in the formats other tools read, each checked before it is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraforge.cli.options import Home
from loraforge.cli.output import console

export_app = typer.Typer(help="Take an adapter elsewhere: a merged Hugging Face model.", no_args_is_help=True)


@export_app.command("merged")
def export_merged(
    adapter: Annotated[Path, typer.Option(help="A trained adapter directory (from `loraforge train`).")],
    out: Annotated[Path, typer.Option(help="The directory to write (a Hugging Face model directory).")],
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16: how the merged weights are stored.")] = "fp32",
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing --out directory.")] = False,
    home: Home = None,
) -> None:
    """Merge the adapter into its base model: a directory transformers loads without loraforge.

    The written model is loaded back with plain transformers and compared with the unmerged adapter
    on fixed prompts; past the dtype's tolerance (printed) the export fails and nothing is written.
    """
    from loraforge.export.merged import export_merged as run
    from loraforge.home import model_cache_dir, resolve_home

    with console.status(f"merging {adapter} into its base model ({dtype}) and checking the result…"):
        done = run(adapter, out, model_cache=model_cache_dir(resolve_home(home)), dtype=dtype, replace=replace)
    check = done.check
    console.print(
        f"wrote [bold]{done.out}[/] ({done.bytes / 1e6:.1f} MB, {done.dtype}); checked against the adapter on "
        f"{check.positions} positions: max logit difference {check.max_abs_logit_diff:.3g} "
        f"(tolerance {check.tolerance:g}), top-1 agreement {check.top1_agreement:.1%}",
        highlight=False,
    )
    console.print(
        f'[dim]load it with: AutoModelForCausalLM.from_pretrained("{done.out}"), AutoTokenizer.from_pretrained(…)[/]',
        highlight=False,
    )
