"""``loraforge export …``: an adapter in the formats other tools read, each checked before it is kept."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from loraforge.cli.options import DatabaseUrl, Home
from loraforge.cli.output import console

export_app = typer.Typer(
    help="Take an adapter elsewhere: a merged Hugging Face model, GGUF for llama.cpp, Ollama, vLLM.",
    no_args_is_help=True,
)


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


@export_app.command("gguf")
def export_gguf(
    adapter: Annotated[Path, typer.Option(help="A trained adapter directory (from `loraforge train`).")],
    out: Annotated[Path, typer.Option(help="The GGUF file to write.")],
    type: Annotated[
        str, typer.Option("--type", help="f32, f16, q8_0 or q4_1 (merged); f32 or f16 (--adapter-only).")
    ] = "f16",
    adapter_only: Annotated[
        bool,
        typer.Option("--adapter-only", help="Write a llama.cpp LoRA adapter, loaded with --lora beside the base GGUF."),
    ] = False,
    base_gguf: Annotated[
        Path | None,
        typer.Option(help="The base model's GGUF; by default the file the base was loaded from (packaged or .gguf)."),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing --out file.")] = False,
    home: Home = None,
) -> None:
    """Write the adapter for llama.cpp and Ollama: merged into its base, or as a LoRA GGUF.

    The file is read back (transformers' GGUF reader for a merged model; the adapter applied to its
    base GGUF for --adapter-only) and compared with the adapter on fixed prompts; past the type's
    tolerance (printed) the export fails and nothing is written.
    """
    from loraforge.export.gguf import export_gguf as run
    from loraforge.home import model_cache_dir, resolve_home

    shape = "an adapter-only GGUF" if adapter_only else "a merged GGUF"
    with console.status(f"writing {adapter} as {shape} ({type}) and checking it…"):
        done = run(
            adapter,
            out,
            model_cache=model_cache_dir(resolve_home(home)),
            type=type,
            adapter_only=adapter_only,
            base_gguf=base_gguf,
            replace=replace,
        )
    check = done.check
    console.print(
        f"wrote [bold]{done.out}[/] ({done.bytes / 1e6:.1f} MB, {shape}, {done.type}); checked against the adapter "
        f"on {check.positions} positions: max logit difference {check.max_abs_logit_diff:.3g} "
        f"(tolerance {check.tolerance:g}), top-1 agreement {check.top1_agreement:.1%}; manifest {done.manifest_path}",
        highlight=False,
    )
    model, lora = shlex.quote(str(done.base_gguf)), shlex.quote(str(done.out))
    run_it = f"llama-cli -m {model} --lora {lora}" if adapter_only else f"llama-cli -m {lora}"
    console.print(f"[dim]run it: {run_it}[/]", highlight=False)


@export_app.command("ollama")
def export_ollama(
    adapter: Annotated[Path, typer.Option(help="A trained adapter directory (from `loraforge train`).")],
    out: Annotated[Path, typer.Option(help="The directory to write: Modelfile, base.gguf, adapter.gguf.")],
    type: Annotated[str, typer.Option("--type", help="f32 or f16: how the LoRA matrices are stored.")] = "f16",
    name: Annotated[str | None, typer.Option(help="The Ollama model name (default: the adapter's).")] = None,
    base_gguf: Annotated[
        Path | None,
        typer.Option(help="The base model's GGUF; by default the file the base was loaded from (packaged or .gguf)."),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing --out directory.")] = False,
    home: Home = None,
) -> None:
    """Write an Ollama model: the base GGUF, the adapter as a LoRA GGUF, and a Modelfile.

    The chat template is translated to Ollama's Go template and checked on sample conversations; the
    adapter GGUF is checked against the adapter as `export gguf --adapter-only` does.
    """
    from loraforge.export.ollama import export_ollama as run
    from loraforge.home import model_cache_dir, resolve_home

    with console.status(f"writing an Ollama model of {adapter} and checking it…"):
        done = run(
            adapter,
            out,
            model_cache=model_cache_dir(resolve_home(home)),
            type=type,
            base_gguf=base_gguf,
            name=name,
            replace=replace,
        )
    check = done.adapter.check
    console.print(
        f"wrote [bold]{done.out}[/] (Modelfile, base.gguf, adapter.gguf); the adapter GGUF on its base: max logit "
        f"difference {check.max_abs_logit_diff:.3g} (tolerance {check.tolerance:g}), "
        f"top-1 agreement {check.top1_agreement:.1%}",
        highlight=False,
    )
    console.print(f"create it: {done.create_command}\nthen:      ollama run {done.model_name}", highlight=False)


@export_app.command("vllm")
def export_vllm(
    adapters: Annotated[
        list[str],
        typer.Option(
            "--adapters",
            help="Registered adapter names, adapter directories, or NAME=DIR (repeat, or separate with commas).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="The directory to write: serve.sh, base/, adapters/NAME/.")],
    max_loras: Annotated[
        int | None, typer.Option(help="Adapters vLLM keeps on the GPU at once (default: all of them).")
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing --out directory.")] = False,
    home: Home = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Write a vLLM deployment: `vllm serve` with --enable-lora for the adapters, and their files.

    Every adapter is checked against vLLM's LoRA support (DoRA, rank, targets, base model) first.
    """
    from loraforge.export.vllm import export_vllm as run
    from loraforge.home import model_cache_dir, resolve_home

    h = resolve_home(home)
    chosen = _named_adapters([item for given in adapters for item in given.split(",") if item.strip()], h, database_url)
    done = run(chosen, out, model_cache=model_cache_dir(h), max_loras=max_loras, replace=replace)
    console.print(
        f"wrote [bold]{done.out}[/] ({len(chosen)} adapter(s), max LoRA rank {done.max_lora_rank}); "
        f"on a GPU machine with vLLM: {done.out / 'serve.sh'}",
        highlight=False,
    )
    console.print(f"[dim]cd {shlex.quote(str(done.out))} && {shlex.join(done.command)}[/]", highlight=False)


def _named_adapters(items: list[str], home: Path, database_url: str | None) -> dict[str, Path]:
    """Served name → directory for each ``NAME=DIR``, directory, or registered adapter name."""
    from loraforge.errors import ConfigError
    from loraforge.serve.adapter_checks import valid_name
    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.home_registry import home_registry

    chosen: dict[str, Path] = {}
    store: AdapterStore | None = None
    for raw in (i.strip() for i in items):
        name, _, given = raw.partition("=") if "=" in raw else ("", "", raw)
        path = Path(given).expanduser()
        if path.is_dir():
            name = name or path.resolve().name
        else:
            store = store or AdapterStore(home, registry=home_registry(home, database_url))
            if store.get(given) is None:
                raise ConfigError(
                    f"{given!r} is neither an adapter directory nor a registered adapter (loraforge adapters list)"
                )
            name, path = name or given, store.path(given)
        if not valid_name(name.removeprefix("ft:")):
            raise ConfigError(f"{name!r} cannot be a served adapter name; use NAME=DIR with letters, digits, -, _ or .")
        served = name.replace(":", "-")
        if served in chosen:
            raise ConfigError(f"the adapter name {served!r} is given twice")
        chosen[served] = path
    return chosen
