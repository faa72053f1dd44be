"""The training recipe: setup → pre-flight estimate → train (with eval and checkpoints) → save.

One readable function, :func:`train`, with the loop written out. Built on accelerate so the same
code runs on one CPU, one GPU, or under ``accelerate launch`` (DDP/FSDP).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loraforge import __version__
from loraforge.data.formats import Format, parse_columns
from loraforge.data.governance import flags_from_evidence, prepare_training_examples
from loraforge.data.licensing import LicenseError, check_licensing, manifest_path_for
from loraforge.data.packing import PackedBatch, PackedRow, collate_rows, pack_examples
from loraforge.data.pii import PiiAction
from loraforge.data.templates import Overlong, TokenizedExample, tokenize_all
from loraforge.data.validate import DataReport, check_dataset, suggest_epochs
from loraforge.errors import CheckpointError, ConfigError, DataError
from loraforge.files import sha256_file, write_text_atomic
from loraforge.models.manifest import (
    FORMAT_VERSION,
    KIND,
    PEFT_FILES,
    AdapterManifest,
    BaseModelRecord,
    GovernanceFlag,
)
from loraforge.models.packed_attention import register_packed_attention
from loraforge.models.precision import resolve_precision
from loraforge.models.sources import BaseModel, load_model, load_tokenizer, resolve_base_model
from loraforge.train.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from loraforge.train.config import TrainConfig
from loraforge.train.estimate import Figures, linear_params, peak_rss_bytes, step_flops, time_probe
from loraforge.train.lora import LabelOnlyLM, add_lora
from loraforge.train.plots import plot_loss_curve

# Fields that do not change what is trained, so a checkpoint stays valid when they differ.
_NOT_IN_FINGERPRINT = (
    "resume",
    "threads",
    "output",
    "price_per_hour",
    "checkpoint_every",
    "keep_checkpoints",
    "manifest",
    "policy",
    "allow_unlicensed",
)


class Reporter:
    """What the loop tells the outside world; the CLI passes a rich-based one. All no-ops here."""

    def estimate(self, figures: Figures, info: dict[str, Any]) -> None: ...
    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def evaluation(self, record: dict[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...
    def finish(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    output: Path
    manifest: AdapterManifest | None  # None on processes other than the main one
    final_loss: float
    val_loss: float | None
    figures: Figures
    warnings: list[str] = field(default_factory=list)


def _data_problems(report: DataReport, limit: int = 20) -> str:
    lines = [str(p) for p in report.errors[:limit]]
    more = len(report.errors) - limit
    return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []))


def _load_split(
    config: TrainConfig, tokenizer: Any
) -> tuple[list[TokenizedExample], list[TokenizedExample], DataReport, DataReport | None, dict[str, Any]]:
    """Check the data, split off validation, apply the governance options, then tokenize.

    Returns:
        (training examples, validation examples, the two data reports, governance evidence).
    """
    columns = parse_columns(config.columns)
    fmt: Format = config.format  # type: ignore[assignment]
    overlong: Overlong = config.overlong  # type: ignore[assignment]
    max_length = config.context_length or config.seq_len

    def check(path: str) -> DataReport:
        return check_dataset(path, tokenizer, format=fmt, columns=columns, max_length=max_length, overlong=overlong)

    report = check(config.data)
    if not report.ok:
        raise DataError(f"{config.data} cannot be trained on; fix these first:\n{_data_problems(report)}")
    vreport = None
    if config.validation:
        vreport = check(config.validation)
        vreport.problems = [p for p in vreport.problems if p.code != "too_few_examples"]
        if not vreport.ok or not vreport.tokenized:
            raise DataError(f"{config.validation} cannot be used for validation:\n{_data_problems(vreport)}")
        train_ex, val_ex = list(report.examples), list(vreport.examples)
    else:
        order = list(range(len(report.examples)))
        random.Random(config.seed).shuffle(order)
        held = set(order[: max(1, round(len(order) * config.validation_split))])
        train_ex = [ex for i, ex in enumerate(report.examples) if i not in held]
        val_ex = [report.examples[i] for i in sorted(held)]
        if not train_ex:
            raise DataError(f"{config.data}: no example left for training after holding out the validation split")
    pii: PiiAction = config.pii  # type: ignore[assignment]
    train_ex, val_kept, evidence = prepare_training_examples(
        train_ex,
        val_ex,
        pii=pii,
        dedupe=config.dedupe,
        threshold=config.near_duplicate_threshold,
        canaries=config.canaries,
        canary_repeats=config.canary_repeats,
        seed=config.seed,
        clean_validation=not config.validation,
        allow_secrets=config.allow_secrets,
    )
    if not val_kept:
        raise DataError("no validation example is left after the PII action; use --pii redact instead of drop")
    train_tok, _, _ = tokenize_all(tokenizer, train_ex, max_length, overlong)
    val_tok, _, _ = tokenize_all(tokenizer, val_kept, max_length, overlong)
    return train_tok, val_tok, report, vreport, evidence


def check_training_licences(
    config: TrainConfig, train_report: DataReport, val_report: DataReport | None
) -> dict[str, Any]:
    """Apply the licence manifest and policy; raise before anything is written if training is refused.

    ``allow_unlicensed`` lets data without a manifest (or records no source covers) through, and is
    recorded; a denied licence or an uncleared review always stops.
    """
    datasets = [(Path(config.data), train_report.examples)]
    if val_report is not None and config.validation:
        datasets.append((Path(config.validation), val_report.examples))
    report = check_licensing(datasets, manifest=config.manifest, policy=config.policy)
    blocking = [d for d in report.decisions if d.blocks_training]
    if blocking or (not report.ok and not config.allow_unlicensed):
        problems = "\n".join(f"- {p}" for p in report.problems())
        hint = (
            f"\nwrite a manifest ({manifest_path_for(config.data).name}, see docs/data.md) or pass --allow-unlicensed"
            if report.missing or report.uncovered
            else ""
        )
        raise LicenseError(f"training refused by the licence check:\n{problems}{hint}")
    return {**report.to_json(), "allow_unlicensed": config.allow_unlicensed}


def _fingerprint(config: TrainConfig, base: BaseModel, hashes: list[str], processes: int) -> str:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"config": cfg, "base": base.sha256, "data": hashes, "processes": processes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:  # step = number of optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _library_versions() -> dict[str, str]:
    import accelerate
    import peft
    import safetensors
    import transformers

    return {
        "loraforge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }


def train(config: TrainConfig, *, model_cache: Path, reporter: Reporter | None = None) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write it, with its evidence, to ``config.output``.

    Raises:
        DataError: the dataset has errors (all listed) or nothing is left after tokenization.
        ModelError: the base model is missing.
        CheckpointError: ``resume`` with no checkpoint, or one from a different run.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    reporter = reporter or Reporter()
    config.require_paths()
    started = time.time()
    output = Path(config.output)
    if config.threads:
        torch.set_num_threads(config.threads)

    # --- setup: data first (cheap, and the most likely to be wrong), then the model ---------------
    base = resolve_base_model(config.base_model, model_cache)
    tokenizer = load_tokenizer(base)
    train_examples, val_examples, train_report, val_report, governance = _load_split(config, tokenizer)
    licensing = check_training_licences(config, train_report, val_report)
    governance_flags = flags_from_evidence(licensing, governance)
    for f in governance_flags:
        reporter.warning(f"governance flag {f['flag']}: {f['detail']}")
    datasets = [{"role": "train", "path": str(Path(config.data).resolve()), "sha256": sha256_file(Path(config.data))}]
    if config.validation:
        p = Path(config.validation)
        datasets.append({"role": "validation", "path": str(p.resolve()), "sha256": sha256_file(p)})

    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {output}: {e.strerror}") from e
    checkpoint = None
    if config.resume and (output / "manifest.json").exists():
        raise CheckpointError(f"{output} holds a finished run (manifest.json); there is nothing to resume")
    if config.resume:
        checkpoint = latest_checkpoint(output)
        if checkpoint is None:
            raise CheckpointError(
                f"--resume: no complete checkpoint in {output / 'checkpoints'}; start without --resume"
            )
    elif (output / "manifest.json").exists() or (output / "checkpoints").exists():
        raise CheckpointError(
            f"{output} already holds a training run; pass --resume to continue it or choose a new --output"
        )

    set_seed(config.seed)
    accelerator = Accelerator(gradient_accumulation_steps=1)
    fingerprint = _fingerprint(config, base, [d["sha256"] for d in datasets], accelerator.num_processes)
    dtype = resolve_precision(config.precision, accelerator.device)
    model = load_model(base, dtype=dtype, attn_implementation=register_packed_attention())
    model.config.use_cache = False
    peft_model = add_lora(
        model,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )
    net = LabelOnlyLM(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    # --- schedule: deterministic packing per epoch, so a data position is just a step number -----
    epochs = config.epochs or float(suggest_epochs(len(train_examples)))
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id = int(tokenizer.pad_token_id)
    # Pack once, then shuffle the order of rows per epoch: every epoch has the same number of
    # micro-batches, so a data position is just a step number (and resume is exact).
    packed_rows = pack_examples(train_examples, config.seq_len, shuffle_seed=config.seed)
    per_rank = max(1, len(packed_rows) // (config.batch_rows * world)) * config.batch_rows
    epoch_cache: dict[int, list[list[PackedRow]]] = {}

    def micro_batches(epoch: int) -> list[list[PackedRow]]:
        if epoch not in epoch_cache:
            epoch_cache.clear()
            order = list(range(len(packed_rows)))
            random.Random(config.seed + epoch).shuffle(order)
            # every rank gets the same number of rows (a few rows sit out an epoch when they don't divide)
            mine = [packed_rows[i] for i in order[rank::world]][:per_rank] or [packed_rows[order[0]]]
            epoch_cache[epoch] = [mine[i : i + config.batch_rows] for i in range(0, len(mine), config.batch_rows)]
        return epoch_cache[epoch]

    steps_per_epoch = math.ceil(len(micro_batches(0)) / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    warmup_steps = int(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps, config.min_lr_ratio))
    # The scheduler stays outside accelerate: it counts optimizer steps, not processes.
    net, optimizer = accelerator.prepare(net, optimizer)
    val_batches = [
        collate_rows(rows, pad_id) for rows in _chunks(pack_examples(val_examples, config.seq_len), config.batch_rows)
    ]

    def step_batches(step: int) -> list[PackedBatch]:
        groups = micro_batches(step // steps_per_epoch)
        i = (step % steps_per_epoch) * config.grad_accum
        return [collate_rows(g, pad_id) for g in groups[i : i + config.grad_accum]]

    def forward(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        dev = accelerator.device
        loss_sum, n = net(batch.input_ids.to(dev), batch.position_ids.to(dev), batch.targets.to(dev))
        return loss_sum, n

    # --- pre-flight estimate: time one real micro-batch and extrapolate ---------------------------
    epoch_tokens = sum(len(t.input_ids) for t in train_examples)
    epoch_trained = sum(t.num_trained for t in train_examples)
    tokens_total = int(epoch_tokens * total_steps / steps_per_epoch)
    trained_total = int(epoch_trained * total_steps / steps_per_epoch)
    n_linear, n_head = linear_params(peft_model.get_base_model())
    probe = step_batches(0)[0]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def probe_once() -> None:
        loss_sum, n = forward(probe)
        accelerator.backward(loss_sum / n)
        optimizer.zero_grad(set_to_none=True)

    net.train()
    seconds_per_token = time_probe(probe_once, repeats=2) / max(1, probe.num_tokens)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    n_evals = (total_steps // config.eval_every if config.eval_every else 0) + 1
    val_tokens = sum(b.num_tokens for b in val_batches)
    lora_bytes = sum(p.numel() for p in trainable) * 4 * 3  # weights' gradients + two Adam moments
    estimate = Figures(
        tokens=tokens_total,
        trained_tokens=trained_total,
        flops=step_flops(n_linear, n_head, tokens_total, trained_total),
        seconds=seconds_per_token * (tokens_total + n_evals * val_tokens / 3),
        peak_rss_bytes=peak_rss_bytes() + lora_bytes,
        price_per_hour=config.price_per_hour,
    )
    info = {
        "base_model": base.name,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(accelerator.device),
        "train_examples": len(train_examples),
        "validation_examples": len(val_examples),
        "epochs": round(total_steps / steps_per_epoch, 2),
        "steps": total_steps,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    reporter.estimate(estimate, info)

    # --- resume ---------------------------------------------------------------------------------
    start_step = 0
    records: list[dict[str, Any]] = []
    tokens_done = trained_done = 0
    train_seconds = 0.0
    metrics_path = output / "metrics.jsonl"
    if checkpoint is not None:
        restore_checkpoint(checkpoint, peft_model, optimizer, scheduler, fingerprint)
        start_step = checkpoint.step
        records = [r for r in checkpoint.state.get("records", []) if r["step"] <= start_step]
        tokens_done = int(checkpoint.state.get("tokens_done", 0))
        trained_done = int(checkpoint.state.get("trained_done", 0))
        train_seconds = float(checkpoint.state.get("train_seconds", 0.0))
    # metrics.jsonl is rewritten from what the checkpoint knew: lines of a killed run's lost steps go
    write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def evaluate() -> float:
        net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in val_batches:
                loss_sum, n = forward(batch)
                total += float(loss_sum)
                count += int(n)
        net.train()
        return total / max(1, count)

    warnings: list[str] = list(checkpoint.state.get("warnings", [])) if checkpoint else []
    # rebuilt from the records, so a resumed run compares against evaluations made before the kill
    evals = [r for r in records if r["kind"] == "eval"]
    last_eval: tuple[float, float] | None = (evals[-1]["train_loss"], evals[-1]["val_loss"]) if evals else None
    last_eval_step = evals[-1]["step"] if evals else 0
    since_eval = [r["loss"] for r in records if r["kind"] == "train" and r["step"] > last_eval_step]
    reporter.start(total_steps, start_step)
    metrics_file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)
    try:
        net.train()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            batches = step_batches(step)
            n_targets = sum(b.num_targets for b in batches)
            loss_total = 0.0
            for batch in batches:
                loss_sum, _ = forward(batch)
                accelerator.backward(loss_sum / n_targets)  # mean over every target of the step
                loss_total += float(loss_sum.detach())
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_seconds += dt
            n_tokens = sum(b.num_tokens for b in batches)
            tokens_done += n_tokens
            trained_done += n_targets
            loss = loss_total / n_targets
            since_eval.append(loss)
            record = {
                "kind": "train",
                "step": step + 1,
                "epoch": round((step + 1) / steps_per_epoch, 3),
                "loss": round(loss, 5),
                "lr": lr,
                "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / dt, 1),
                "elapsed_s": round(train_seconds, 2),
            }
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            reporter.step(record)
            done = step + 1 == total_steps
            if (config.eval_every and (step + 1) % config.eval_every == 0) or done:
                eval_loss = evaluate()
                train_avg = sum(since_eval) / len(since_eval)
                since_eval = []
                ev = {
                    "kind": "eval",
                    "step": step + 1,
                    "val_loss": round(eval_loss, 5),
                    "train_loss": round(train_avg, 5),
                }
                records.append(ev)
                metrics_file.write(json.dumps(ev) + "\n")
                metrics_file.flush()
                reporter.evaluation(ev)
                if last_eval and eval_loss > last_eval[1] and train_avg < last_eval[0]:
                    msg = (
                        f"step {step + 1}: validation loss rose ({last_eval[1]:.4f} → {eval_loss:.4f}) while "
                        f"training loss fell ({last_eval[0]:.4f} → {train_avg:.4f}): the adapter may be "
                        "overfitting; consider fewer epochs or a lower learning rate"
                    )
                    warnings.append(msg)
                    reporter.warning(msg)
                last_eval = (train_avg, eval_loss)
            checkpoint_due = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if checkpoint_due and not done and accelerator.is_main_process:
                save_checkpoint(
                    output,
                    step + 1,
                    peft_model,
                    optimizer,
                    scheduler,
                    {
                        "fingerprint": fingerprint,
                        "records": records,
                        "tokens_done": tokens_done,
                        "trained_done": trained_done,
                        "train_seconds": train_seconds,
                        "warnings": warnings,
                    },
                    config.keep_checkpoints,
                )
    finally:
        metrics_file.close()

    # --- save: adapter files first, the manifest last (its presence marks a complete run) --------
    actual = Figures(
        tokens=tokens_done,
        trained_tokens=trained_done,
        flops=step_flops(n_linear, n_head, tokens_done, trained_done),
        seconds=train_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        price_per_hour=config.price_per_hour,
    )
    final_loss: float = next(r["loss"] for r in reversed(records) if r["kind"] == "train")
    val_loss: float | None = next((r["val_loss"] for r in reversed(records) if r["kind"] == "eval"), None)
    manifest: AdapterManifest | None = None
    if accelerator.is_main_process:
        save_adapter(peft_model, output)
        plot_loss_curve(records, output / "loss.png", f"{base.name} + LoRA r={config.lora_r}")
        manifest = AdapterManifest(
            kind=KIND,
            format_version=FORMAT_VERSION,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            base_model=BaseModelRecord(**base.to_json()),
            datasets=[
                {**d, **r.summary()} if r else d for d, r in zip(datasets, [train_report, val_report], strict=False)
            ],
            split={
                "train_examples": len(train_examples),
                "validation_examples": len(val_examples),
                "validation": "file"
                if config.validation
                else f"held out {config.validation_split:.0%} (seed {config.seed})",
            },
            licensing=licensing,
            data_governance=governance,
            governance_flags=[GovernanceFlag(**f) for f in governance_flags],
            config=config.to_dict(),
            precision={
                "base": str(dtype).removeprefix("torch."),
                "adapter": "float32",
                "optimizer": "float32",
            },
            metrics={
                "final_train_loss": final_loss,
                "final_val_loss": val_loss,
                "steps": total_steps,
                "epochs": round(total_steps / steps_per_epoch, 3),
            },
            estimate=estimate.to_json(),
            actual=actual.to_json(),
            timings={
                "wall_seconds": round(time.time() - started, 2),
                "train_seconds": round(train_seconds, 2),
            },
            cost={"amount": round(actual.cost, 6), "price_per_hour": config.price_per_hour},
            libraries=_library_versions(),
            machine={
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
            },
            warnings=warnings,
            files={
                "adapter": list(PEFT_FILES),
                "metrics": "metrics.jsonl",
                "loss_curve": "loss.png",
            },
            checksums={name: sha256_file(output / name) for name in PEFT_FILES},
            fingerprint=fingerprint,
        )
        manifest.write(output)
    result = TrainResult(output, manifest, final_loss, val_loss, actual, warnings)
    reporter.finish(result)
    return result


def _chunks(rows: list[PackedRow], size: int) -> list[list[PackedRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def save_adapter(peft_model: Any, output: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``output`` atomically."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter.", dir=output))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
