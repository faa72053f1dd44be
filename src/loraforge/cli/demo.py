"""``make demo`` (``python -m loraforge.cli.demo``): the main job end to end on the embedded default model.

Checks the bundled sample dataset, trains a LoRA adapter on SmolLM2-135M-Instruct, compares base
and tuned answers on held-out questions, evaluates the adapter against the base model (every
suite on smaller subsets than ``loraforge eval`` uses, ``DEMO_EVAL_ITEMS`` items per set) and
applies the release gate, releases it (registered, approved by another person's key, deployed on a
route, its model card and compliance report written), asks the route one question with the
``openai`` SDK and a production key, exports it (a merged model, and a LoRA GGUF for llama.cpp), and
prints where everything is. Each step is the same
public function the CLI calls; the equivalent commands are printed as it goes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from loraforge.errors import LoraforgeError

SAMPLES = Path(__file__).parents[1] / "samples"


def run(console: Console) -> int:
    from loraforge.cli.output import VERDICT_COLOUR, show_data_report, show_governance, show_licensing
    from loraforge.cli.train_progress import RichReporter
    from loraforge.data.datasheet import build_datasheet, write_datasheet
    from loraforge.data.formats import load_dataset
    from loraforge.data.prepare import check_data
    from loraforge.data.scan import scan_examples
    from loraforge.home import model_cache_dir, resolve_home
    from loraforge.models.generate import load_chat_model
    from loraforge.models.manifest import read_manifest
    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_tokenizer, resolve_base_model
    from loraforge.runtime import configure_process
    from loraforge.train import TrainConfig, train

    configure_process()
    home = resolve_home()
    cache = model_cache_dir()
    out_root = Path(os.environ.get("DEMO_OUT", "runs/demo")).resolve()
    output = out_root / time.strftime("adapter-%Y%m%d-%H%M%S")
    data, holdout = SAMPLES / "support.jsonl", SAMPLES / "support_holdout.jsonl"

    console.print(Rule("1. check the sample dataset: structure, licences, personal data, duplicates"))
    console.print(f"$ loraforge data check {data} --against {holdout}")
    base = resolve_base_model(DEFAULT_BASE_MODEL, cache)
    tokenizer = load_tokenizer(base)
    checked = check_data(data, tokenizer, against=holdout)
    report, licensing, governance = checked.report, checked.licensing, checked.governance
    if licensing is not None:
        show_licensing(console, licensing)
    show_governance(console, governance)
    show_data_report(console, report)
    if not report.ok:
        return 1
    console.print(f"$ loraforge data report {data} --out {output.parent / 'datasheet'}")
    _, scan = scan_examples(report.examples)
    _, datasheet = write_datasheet(build_datasheet(report, licensing, scan), output.parent / "datasheet")
    console.print(f"datasheet: {datasheet}")

    console.print(Rule("2. train a LoRA adapter on the default base model"))
    epochs = float(os.environ.get("DEMO_EPOCHS", "2"))
    console.print(f"$ loraforge train --data {data} --validation {holdout} --epochs {epochs:g} --output {output}")
    config = TrainConfig(data=str(data), validation=str(holdout), output=str(output), epochs=epochs, eval_every=20)
    result = train(config, model_cache=cache, reporter=RichReporter(console))

    console.print(Rule("3. base vs tuned on held-out questions"))
    examples = load_dataset(holdout).examples
    picks = [examples[i] for i in (0, len(examples) // 2, len(examples) - 1)]
    base_model = load_chat_model(cache, base_model=DEFAULT_BASE_MODEL)
    tuned = load_chat_model(cache, adapter=output)
    for ex in picks:
        system = next((m.content for m in ex.messages if m.role == "system"), None)
        question = next(m.content for m in ex.messages if m.role == "user")
        reference = next(m.content for m in ex.messages if m.role == "assistant")
        table = Table(title=f"Q: {question}", title_justify="left", show_header=False, expand=True)
        table.add_column(width=10)
        table.add_column()
        table.add_row("[dim]base", base_model.chat(question, system=system, max_new_tokens=80))
        table.add_row("[bold green]tuned", tuned.chat(question, system=system, max_new_tokens=80))
        table.add_row("[dim]reference", reference)
        console.print(table)

    console.print(Rule("4. evaluate base vs adapter and apply the release gate"))
    from loraforge.cli.output import show_evaluation
    from loraforge.evaluate import DEFAULT_SIZES, EvalConfig, evaluate

    cap = int(os.environ.get("DEMO_EVAL_ITEMS", "20"))
    console.print(f"$ loraforge eval --adapter {output} --max-items {cap}")
    evaluation = evaluate(
        EvalConfig(output, sizes={k: min(v, cap) for k, v in DEFAULT_SIZES.items()}),
        model_cache=cache,
        progress=lambda msg: console.print(f"[dim]{escape(msg)}[/]"),
    )
    show_evaluation(console, evaluation)

    console.print(Rule("5. release it (approve, deploy on a route, document) and ask the route with the openai SDK"))
    from loraforge.cli.demo_serve import serve_demo

    first = picks[0]
    released = serve_demo(
        console,
        output,
        home,
        next(m.content for m in first.messages if m.role == "user"),
        next((m.content for m in first.messages if m.role == "system"), None),
    )

    console.print(Rule("6. export it as a merged model that plain transformers loads"))
    from loraforge.export.merged import export_merged

    merged_dir = output.parent / f"{output.name}-merged-bf16"
    console.print(f"$ loraforge export merged --adapter {output} --out {merged_dir} --dtype bf16")
    exported = export_merged(output, merged_dir, model_cache=cache, dtype="bf16")
    check = exported.check
    console.print(
        f"loaded back with transformers and compared with the adapter on {check.positions} positions: "
        f"max logit difference {check.max_abs_logit_diff:.3g} (tolerance {check.tolerance:g}), mean "
        f"{check.mean_abs_logit_diff:.3g} (the adapter moves the base by {check.adapter_effect:.3g}), "
        f"top-1 agreement {check.top1_agreement:.1%}",
        highlight=False,
    )

    console.print(Rule("7. export it for llama.cpp and Ollama: a LoRA GGUF beside the base GGUF"))
    from loraforge.export.gguf import export_gguf

    lora_gguf = output.parent / f"{output.name}-lora.gguf"
    console.print(f"$ loraforge export gguf --adapter {output} --out {lora_gguf} --adapter-only")
    gguf = export_gguf(output, lora_gguf, model_cache=cache, type="f16", adapter_only=True, replace=True)
    console.print(
        f"read back, applied to {gguf.base_gguf.name} and compared with the adapter: max logit difference "
        f"{gguf.check.max_abs_logit_diff:.3g} (tolerance {gguf.check.tolerance:g}), top-1 agreement "
        f"{gguf.check.top1_agreement:.1%}",
        highlight=False,
    )

    console.print(Rule("results"))
    manifest = read_manifest(output)
    console.print(f"base model:  {base.name} (sha256 {base.sha256[:16]}…, cached in {base.path})")
    console.print(f"validation loss: {manifest.metrics['final_val_loss']}")
    console.print(f"adapter (PEFT):  {output}")
    console.print(f"manifest:        {output / 'manifest.json'}")
    console.print(f"metrics:         {output / 'metrics.jsonl'}")
    console.print(f"loss curve:      {output / 'loss.png'}")
    console.print(f"datasheet:       {datasheet}")
    verdict = evaluation.verdict
    colour = VERDICT_COLOUR[verdict.word]
    console.print(
        f"release gate:    [bold {colour}]{verdict.word}[/] ({len(verdict.failures)} rule(s) broken, "
        f"{len(verdict.inconclusive)} inconclusive)"
    )
    console.print(f"evaluation:      {evaluation.html_path}")
    console.print(f"merged model:    {merged_dir} ({exported.bytes / 1e6:.0f} MB, bf16; loads with transformers alone)")
    console.print(f"LoRA GGUF:       {lora_gguf} ({gguf.bytes / 1e6:.1f} MB; llama-cli -m {gguf.base_gguf} --lora …)")
    lic = manifest.licensing or {}
    decisions = ", ".join(f"{d['source']}: {d['license']} → {d['verdict']}" for d in lic["decisions"])
    console.print(
        f"licences:        {decisions} "
        f"(policy {lic['policy']['name']}); PII action: {(manifest.data_governance or {})['pii']['action']}"
    )
    console.print(f"release:         route {released.route} → {released.adapter} (approved, deployed)")
    console.print(f"model card:      {released.report / 'model_card.html'}")
    console.print(
        f"compliance:      {released.report / 'compliance.html'} ({released.open_items} open item(s), "
        "each under the controls it would support)"
    )
    console.print(f"server log:      {released.server_log}")
    console.print(f"home:            {home} (the registry: adapters, key hashes, usage; the audit log)")
    cli = Path(sys.executable).parent / "loraforge"
    console.print(f'try it:          {cli} generate --adapter {output} --prompt "Can I return a bike?"')
    console.print(f"serve it:        {cli} serve --home {home}   (then any OpenAI client, model {released.route!r})")
    del result
    return 0


def main() -> None:
    console = Console()
    try:
        sys.exit(run(console))
    except LoraforgeError as e:
        console.print(f"[red]error[/]: {escape(str(e))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
