"""The training recipe: setup → pre-flight estimate → train (with eval and checkpoints) → save.

One readable function, :func:`train`, with the loop written out; its setup steps are in
:mod:`loraforge.train.setup` (the data through :mod:`loraforge.data.prepare`), the step schedule in
:mod:`loraforge.train.schedule` and what it writes in :mod:`loraforge.train.output`. Built on
accelerate so the same code runs on one CPU, one GPU, or under ``accelerate launch`` (DDP/FSDP).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.data.packing import PackedBatch
from loraforge.data.validate import suggest_epochs
from loraforge.files import write_text_atomic
from loraforge.models.manifest import AdapterManifest
from loraforge.models.precision import resolve_precision
from loraforge.models.sources import load_tokenizer, resolve_base_model
from loraforge.train.checkpoint import Progress, restore_checkpoint, save_checkpoint
from loraforge.train.config import TrainConfig
from loraforge.train.estimate import Figures, estimate_run, linear_params, peak_rss_bytes, step_flops, time_probe
from loraforge.train.lora import LabelOnlyLM
from loraforge.train.output import build_manifest, claim_output, save_adapter, save_input_profile
from loraforge.train.plots import plot_loss_curve
from loraforge.train.schedule import Schedule, validation_batches
from loraforge.train.setup import (
    dataset_records,
    lora_model,
    optimizer_and_scheduler,
    prepare_training_data,
    run_fingerprint,
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


def overfitting_warning(step: int, last_eval: tuple[float, float], train_avg: float, eval_loss: float) -> str | None:
    """A warning when validation loss rose while training loss fell since the last evaluation.

    Args:
        step: the optimizer steps done; last_eval: (training loss, validation loss) at the last
            evaluation; train_avg: the mean training loss of the steps since.
    """
    if eval_loss > last_eval[1] and train_avg < last_eval[0]:
        return (
            f"step {step}: validation loss rose ({last_eval[1]:.4f} → {eval_loss:.4f}) while "
            f"training loss fell ({last_eval[0]:.4f} → {train_avg:.4f}): the adapter may be "
            "overfitting; consider fewer epochs or a lower learning rate"
        )
    return None


def train(config: TrainConfig, *, model_cache: Path, reporter: Reporter | None = None) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write it, with its evidence, to ``config.output``.

    Raises:
        DataError: the dataset has errors (all listed) or nothing is left after tokenization.
        LicenseError: the licences refuse training (nothing is written).
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
    data = prepare_training_data(config, tokenizer)
    for f in data.flags:
        reporter.warning(f"governance flag {f['flag']}: {f['detail']}")
    datasets = dataset_records(config)
    checkpoint = claim_output(output, config.resume)

    set_seed(config.seed)
    accelerator = Accelerator(gradient_accumulation_steps=1)
    fingerprint = run_fingerprint(config, base, [d["sha256"] for d in datasets], accelerator.num_processes)
    dtype = resolve_precision(config.precision, accelerator.device)
    peft_model = lora_model(config, base, dtype)
    net = LabelOnlyLM(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    pad_id = int(tokenizer.pad_token_id)
    schedule = Schedule(
        data.train,
        seq_len=config.seq_len,
        batch_rows=config.batch_rows,
        grad_accum=config.grad_accum,
        seed=config.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        pad_id=pad_id,
        epochs=config.epochs or float(suggest_epochs(len(data.train))),
        max_steps=config.max_steps,
    )
    total_steps, steps_per_epoch = schedule.total_steps, schedule.steps_per_epoch
    optimizer, scheduler = optimizer_and_scheduler(config, trainable, total_steps)
    # The scheduler stays outside accelerate: it counts optimizer steps, not processes.
    net, optimizer = accelerator.prepare(net, optimizer)
    val_batches = validation_batches(data.validation, config.seq_len, config.batch_rows, pad_id)

    def forward(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of token losses, targets, targets predicted right) of one micro-batch."""
        dev = accelerator.device
        loss_sum, n, correct = net(batch.input_ids.to(dev), batch.position_ids.to(dev), batch.targets.to(dev))
        return loss_sum, n, correct

    # --- pre-flight estimate: time one real micro-batch and extrapolate ---------------------------
    n_linear, n_head = linear_params(peft_model.get_base_model())
    probe = schedule.step_batches(0)[0]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def probe_once() -> None:
        loss_sum, n, _ = forward(probe)
        accelerator.backward(loss_sum / n)
        optimizer.zero_grad(set_to_none=True)

    net.train()
    seconds_per_token = time_probe(probe_once, repeats=2) / max(1, probe.num_tokens)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    n_evals = (total_steps // config.eval_every if config.eval_every else 0) + 1
    val_tokens = sum(b.num_tokens for b in val_batches)
    estimate = estimate_run(
        data.train,
        steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        n_linear=n_linear,
        n_head=n_head,
        seconds_per_token=seconds_per_token,
        eval_tokens=n_evals * val_tokens / 3,
        extra_bytes=sum(p.numel() for p in trainable) * 4 * 3,  # weights' gradients + two Adam moments
        price_per_hour=config.price_per_hour,
    )
    info = {
        "base_model": base.name,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(accelerator.device),
        "train_examples": len(data.train),
        "validation_examples": len(data.validation),
        "epochs": round(total_steps / steps_per_epoch, 2),
        "steps": total_steps,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    reporter.estimate(estimate, info)

    # --- resume ---------------------------------------------------------------------------------
    start_step = 0
    if checkpoint is not None:
        restore_checkpoint(checkpoint, peft_model, optimizer, scheduler, fingerprint)
        start_step = checkpoint.step
    progress = Progress.restored(checkpoint)
    records, warnings = progress.records, progress.warnings
    metrics_path = output / "metrics.jsonl"
    # metrics.jsonl is rewritten from what the checkpoint knew: lines of a killed run's lost steps go
    write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def evaluate() -> tuple[float, float]:
        """The validation set's mean token loss and mean token accuracy."""
        net.eval()
        total, count, right = 0.0, 0, 0
        with torch.no_grad():
            for batch in val_batches:
                loss_sum, n, correct = forward(batch)
                total += float(loss_sum)
                count += int(n)
                right += int(correct)
        net.train()
        return total / max(1, count), right / max(1, count)

    # rebuilt from the records, so a resumed run compares against evaluations made before the kill
    evals = [r for r in records if r["kind"] == "eval"]
    last_eval: tuple[float, float] | None = (evals[-1]["train_loss"], evals[-1]["val_loss"]) if evals else None
    last_eval_step = evals[-1]["step"] if evals else 0
    since_eval = [r["loss"] for r in records if r["kind"] == "train" and r["step"] > last_eval_step]

    # --- train: forward, backward, step; evaluate and checkpoint on their schedule ----------------
    reporter.start(total_steps, start_step)
    metrics_file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    try:
        net.train()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            batches = schedule.step_batches(step)
            n_targets = sum(b.num_targets for b in batches)
            loss_total, right = 0.0, 0
            for batch in batches:
                loss_sum, _, correct = forward(batch)
                accelerator.backward(loss_sum / n_targets)  # mean over every target of the step
                loss_total += float(loss_sum.detach())
                right += int(correct)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            progress.train_seconds += dt
            n_tokens = sum(b.num_tokens for b in batches)
            progress.tokens_done += n_tokens
            progress.trained_done += n_targets
            loss = loss_total / n_targets
            since_eval.append(loss)
            record = {
                "kind": "train",
                "step": step + 1,
                "total_steps": total_steps,
                "epoch": round((step + 1) / steps_per_epoch, 3),
                "loss": round(loss, 5),
                "accuracy": round(right / n_targets, 5),  # of the next token, at the targets
                "lr": lr,
                "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / dt, 1),
                "elapsed_s": round(progress.train_seconds, 2),
            }
            log(record)
            reporter.step(record)
            done = step + 1 == total_steps
            if (config.eval_every and (step + 1) % config.eval_every == 0) or done:
                eval_loss, eval_accuracy = evaluate()
                train_avg = sum(since_eval) / len(since_eval)
                since_eval = []
                ev = {
                    "kind": "eval",
                    "step": step + 1,
                    "val_loss": round(eval_loss, 5),
                    "val_accuracy": round(eval_accuracy, 5),
                    "train_loss": round(train_avg, 5),
                }
                log(ev)
                reporter.evaluation(ev)
                if last_eval and (msg := overfitting_warning(step + 1, last_eval, train_avg, eval_loss)):
                    warnings.append(msg)
                    reporter.warning(msg)
                last_eval = (train_avg, eval_loss)
            checkpoint_due = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if checkpoint_due and not done and accelerator.is_main_process:
                state = progress.state(fingerprint)
                save_checkpoint(output, step + 1, peft_model, optimizer, scheduler, state, config.keep_checkpoints)
    finally:
        metrics_file.close()

    # --- save: adapter files first, the manifest last (its presence marks a complete run) --------
    actual = Figures(
        tokens=progress.tokens_done,
        trained_tokens=progress.trained_done,
        flops=step_flops(n_linear, n_head, progress.tokens_done, progress.trained_done),
        seconds=progress.train_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        price_per_hour=config.price_per_hour,
    )
    final_loss: float = next(r["loss"] for r in reversed(records) if r["kind"] == "train")
    val_loss: float | None = next((r["val_loss"] for r in reversed(records) if r["kind"] == "eval"), None)
    manifest: AdapterManifest | None = None
    if accelerator.is_main_process:
        save_adapter(peft_model, output)
        unwatched = save_input_profile(data.train_report.examples, output)
        if unwatched:
            warnings.append(unwatched)
            reporter.warning(unwatched)
        plot_loss_curve(records, output / "loss.png", f"{base.name} + LoRA r={config.lora_r}")
        manifest = build_manifest(
            config=config,
            base=base,
            data=data,
            datasets=datasets,
            dtype=dtype,
            final_loss=final_loss,
            val_loss=val_loss,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            estimate=estimate,
            actual=actual,
            started=started,
            train_seconds=progress.train_seconds,
            warnings=warnings,
            output=output,
            fingerprint=fingerprint,
        )
        manifest.write(output)
    result = TrainResult(output, manifest, final_loss, val_loss, actual, warnings)
    reporter.finish(result)
    return result
