"""The training loop, readable top to bottom: ``train(cfg)``.

    load base ─► tokenize data ─► inject LoRA ─► AdamW (adapter parameters only) + schedule
        ─► [resume] ─► for each step: grad_accum micro-batches ─► loss.backward ─► guard
        ─► clip ─► optimizer.step ─► metrics / eval / checkpoint ─► final adapter + README + PNG

The loss of a step is the mean cross-entropy over every trained token of all its
micro-batches (sum over tokens / number of trained tokens), so gradient accumulation
computes exactly the loss of one big batch:

    loss = (1 / N) sum_{b, t : labels[b, t+1] != -100} -log softmax(h[b, t] W_head^T)[labels[b, t+1]]

Only the positions that carry a label go through the output head (the largest matrix of
a small LM: 576 x 49152 for SmolLM2-135M): hidden states (B, T, H) -> (N, H) -> (N, V).

DDP-ready: no global state; every function takes what it needs; files are written only by
the main process (``Dist.is_main``); the data stream takes rank / world_size.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import LoraError
from .checkpoint import check_compatible, latest_checkpoint, list_checkpoints, restore, save_checkpoint
from .config import TrainConfig
from .data import IGNORE, Batches, DataStats, eval_batches, load_examples, pack, read_jsonl, split_records
from .outputs import Dist, MetricsLog, adapter_readme, plot_losses, write_text


class TrainingError(LoraError):
    """Training cannot go on (non-finite loss, nothing to resume, ...)."""


@dataclass
class TrainResult:
    """What ``train`` returns: where the adapter is and how the run went."""

    adapter_dir: Path
    out_dir: Path
    steps: int
    seconds: float
    tokens: int
    tokens_per_s: float
    losses: list[float] = field(default_factory=list)        # per step run in this process
    final_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    resumed_from: Optional[int] = None
    bad_steps: int = 0                  # steps skipped for a non-finite loss or gradient
    data: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, loaded=None, dist: Optional[Dist] = None,
          callbacks: tuple[Callable[[int, dict], None], ...] = ()) -> TrainResult:
    """Fine-tune a LoRA adapter as ``cfg`` says; returns a TrainResult.

    ``loaded`` (a lorakit.models.LoadedModel) reuses an already loaded base; the new adapter
    stays on it afterwards (named ``cfg.lora.adapter_name``). ``callbacks`` are called after
    every step with (step, metrics row).
    """
    from ..adapters import adapter_parameters, set_adapter
    from ..inject import inject
    from ..io import save_adapter
    from ..models import load_base

    dist = dist or Dist()
    out = Path(cfg.run.out_dir)
    name = cfg.lora.adapter_name
    if dist.is_main:
        write_text(out / "train_config.yaml", cfg.to_yaml())

    # 1. the base model and the data
    if loaded is None:
        loaded = load_base(cfg.model.model, cfg.model.dtype, cfg.model.device)
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    train_set, valid_set, data_info = prepare_data(cfg, tok)

    # 2. the adapter: seeded, so the same config gives the same initial A
    torch.manual_seed(cfg.run.seed)
    lora_cfg = cfg.lora.to_lora_config(loaded.name)
    if loaded.dtype != torch.float32:
        lora_cfg = lora_cfg.replace(adapter_dtype="float32")   # train A, B in float32 on a half base
    inject(model, lora_cfg, name=name)
    set_adapter(model, name)                  # a model may already carry other (frozen) adapters
    params = list(adapter_parameters(model, name))

    # 3. optimizer over adapter parameters only, and the learning-rate schedule
    o = cfg.optim
    optimizer = adamw(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.run.steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
    batches = Batches(train_set, o.batch_size, cfg.run.seed, tok.pad_token_id, dist.rank, dist.world_size)
    metrics = MetricsLog(out, enabled=dist.is_main)

    # 4. resume: adapter, optimizer, scheduler, RNG and data position from the latest checkpoint
    start = 0
    if cfg.run.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoints'} (run without --resume to start)")
        check_compatible(ckpt, cfg.to_dict(), model)
        restore(ckpt, model, name, optimizer, scheduler)
        batches.load_state(ckpt.info["data"])
        start = ckpt.step
        metrics.truncate_after(start)
    else:
        stale = [step for step, _ in list_checkpoints(out)]
        if stale:
            raise TrainingError(f"{out / 'checkpoints'} holds checkpoints of an earlier run (steps {stale}); pass "
                                "--resume to continue it, or use another --out-dir (or delete them)")
        metrics.reset()

    # 5. the steps
    precision = resolve_precision(cfg.run.precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    result = TrainResult(out / "adapter", out, cfg.run.steps, 0.0, 0, 0.0, resumed_from=start or None,
                         data=data_info)
    bar = progress_bar(start, cfg.run.steps, enabled=cfg.run.progress and dist.is_main)
    bad_in_a_row = 0
    t_run = time.perf_counter()
    model.train()
    if cfg.run.compile:                       # regional: one graph for all decoder layers; undone below
        from ..compiled import compile_blocks
        compile_blocks(model)
    try:
        for step in range(start + 1, cfg.run.steps + 1):
            t0 = time.perf_counter()
            micro = [to_device(batches.next(), device) for _ in range(o.grad_accum)]
            loss, n_tokens = train_step(model, micro, precision, scaler)
            lr = optimizer.param_groups[0]["lr"]                      # the lr this step used
            stepped, grad_norm = guarded_step(params, optimizer, scaler, o.max_grad_norm, loss)
            bad_in_a_row = 0 if stepped else bad_in_a_row + 1
            result.bad_steps += not stepped
            if bad_in_a_row >= cfg.run.max_bad_steps:
                stop_on_bad_steps(cfg, out, step, bad_in_a_row, model, name, optimizer, scheduler, batches, dist)
            scheduler.step()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "eval_loss": None, "lr": lr,
                   "tokens": n_tokens, "tokens_per_s": n_tokens / dt, "grad_norm": grad_norm,
                   "elapsed_s": time.perf_counter() - t_run, "skipped": int(not stepped),
                   "bad_steps": result.bad_steps}
            if valid_set and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.run.steps):
                row["eval_loss"] = evaluate(model, valid_set, o.batch_size, tok.pad_token_id, device, precision,
                                            cfg.run.eval_batches)
                result.final_eval_loss = row["eval_loss"]
            metrics.append(row)
            result.losses.append(loss)
            result.tokens += n_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.run.steps and dist.is_main:
                save_checkpoint(out, step, model, name, optimizer, scheduler, batches.state(),
                                {"loss": loss, "config": cfg.to_dict()}, cfg.run.keep_last)
            for cb in callbacks:
                cb(step, row)
    finally:
        bar.close()
        model.eval()
        if cfg.run.compile:                   # the model goes back to the caller as it came: eager
            from ..compiled import uncompile
            uncompile(model)

    # 6. the final adapter (PEFT layout) with its README, the metrics and the loss curve
    result.seconds = time.perf_counter() - t_run
    result.tokens_per_s = result.tokens / result.seconds if result.seconds > 0 else 0.0
    result.final_loss = metrics.rows[-1]["loss"] if metrics.rows else None
    if dist.is_main:
        save_adapter(model, result.adapter_dir, name=name, base_model_name_or_path=loaded.name)
        write_text(result.adapter_dir / "README.md", adapter_readme(
            loaded.name, data_info, cfg.run.steps, result.final_loss, result.final_eval_loss,
            cfg.to_dict()["lora"], result.seconds))
        metrics.write_csv()
        if metrics.rows:
            plot_losses(metrics.rows, out / "loss.png", title=f"LoRA on {loaded.name}")
    return result


# ------------------------------------------------------------------------------ one step
def train_step(model, micro: list[dict[str, torch.Tensor]], precision: str, scaler=None) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    Returns (mean loss per trained token, number of input tokens that are not padding).
    """
    n_trained = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    total, n_input = 0.0, 0
    for b in micro:
        with autocast(precision, b["input_ids"].device):
            loss_sum, _ = causal_lm_loss(model, b)
        loss = loss_sum / max(n_trained, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
        n_input += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    return total, n_input


def adamw(params: list, **kwargs) -> torch.optim.AdamW:
    """AdamW over ``params``: torch's fused implementation (one kernel for all of them) with
    lorakit's lean step (``lorakit.train.optim.AdamW``: no per-parameter Python per step), when
    torch has a fused kernel for their device and dtype (CUDA, CPU, ...); torch's default elsewhere.
    On 2 CPU cores the fused step of 224 SmolLM-sized adapters takes 4.6 ms against the default's
    21.7 ms; on the H200's host step + zero_grad take 1.38 ms against torch's fused step's 2.26 ms
    and its default's 4.76 ms (bench/host_cost.py, ``host_cost_h200_s14h.md``)."""
    from .optim import AdamW, fused_supported
    if params and all(fused_supported(p) for p in params):
        return AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def guarded_step(params: list, optimizer, scaler, max_norm: Optional[float], loss: float
                 ) -> tuple[bool, Optional[float]]:
    """The non-finite guard, then clip and step: returns (stepped, gradient norm).

    A step whose loss or global gradient norm is NaN/Inf changes nothing: its gradients are
    dropped and the weights and optimizer state stay as they were (so they stay finite and
    every checkpoint holds finite values). With fp16 loss scaling, an overflowing gradient is
    the scaler's business (it skips that step and lowers the scale); only the loss counts.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(loss) or (scaler is None and not math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return False, None
    if max_norm is not None and grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, torch.tensor(norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True, norm


def stop_on_bad_steps(cfg: TrainConfig, out: Path, step: int, bad: int, model, name: str, optimizer, scheduler,
                      batches, dist: Dist) -> None:
    """K non-finite steps in a row: save the (still finite) state as a checkpoint and stop."""
    where = "no checkpoint written (not the main process)"
    if dist.is_main:
        path = save_checkpoint(out, step, model, name, optimizer, scheduler, batches.state(),
                               {"loss": None, "config": cfg.to_dict()}, cfg.run.keep_last)
        where = f"the last good state is saved in {path} (--resume continues from it)"
    raise TrainingError(f"step {step}: {bad} steps in a row had a non-finite loss or gradient and were skipped; "
                        f"stopping. {where}. Lower --lr, use --precision fp32, or check the data.")


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of trained tokens) of a causal LM on ``batch``.

    Position t predicts labels[t + 1]. When the model is a plain body + output head (Llama,
    Qwen, Mistral, GPT-2, ...), only labelled positions go through the head; otherwise the
    full logits are computed and the same positions selected.
    """
    labels = batch["labels"][:, 1:]                                   # (B, T-1)
    mask = labels != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    body, head = split_head(model)
    if body is not None:
        hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]    # (B, T-1, H)
        if type(head) is torch.nn.Linear:       # fused with the head, in chunks: no (N, V) logits kept
            from ..loss import linear_cross_entropy
            loss = linear_cross_entropy(hidden[mask], head.weight, labels[mask], head.bias, reduction="sum")
            return loss, int(mask.sum())
        logits = head(hidden[mask])                                            # (N, V)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][mask]         # (N, V)
    loss = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
    return loss, int(mask.sum())


def split_head(model) -> tuple[Any, Any]:
    """(body, head) when logits are exactly head(body(...).last_hidden_state), else (None, None)."""
    cfg = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    body = getattr(model, "base_model", None)
    if cfg is None or not callable(get_head) or body is None or body is model:
        return None, None
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0),
                          ("output_multiplier_scale", None)):
        if getattr(cfg, attr, neutral) not in (neutral, None, 1, 1.0):
            return None, None
    head = get_head()
    return (body, head) if head is not None else (None, None)


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device, precision: str = "fp32", limit: int = 0
             ) -> float:
    """Mean loss per trained token over the validation examples (model back in train mode after)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in eval_batches(examples, batch_size, pad_id, limit):
        with autocast(precision, device):
            s, k = causal_lm_loss(model, to_device(b, device))
        total, n = total + float(s), n + k
    model.train(was_training)
    return total / max(n, 1)


# ------------------------------------------------------------------------------ helpers
def prepare_data(cfg: TrainConfig, tok) -> tuple[list, list, dict[str, Any]]:
    """(train examples, validation examples, a description) as the data section says."""
    d = cfg.data
    records = read_jsonl(d.train_file)
    if d.valid_file:
        train_records, valid_records, valid_path = records, read_jsonl(d.valid_file), d.valid_file
    else:
        train_records, valid_records = split_records(records, d.valid_fraction, cfg.run.seed)
        valid_path = d.train_file
    train_set, stats = load_examples(d.train_file, tok, d.format, d.max_length, d.truncation, train_records)
    valid_set, vstats = ([], DataStats())
    if valid_records:
        valid_set, vstats = load_examples(valid_path, tok, d.format, d.max_length, d.truncation, valid_records)
    if d.packing:
        train_set = pack(train_set, d.max_length)
    valid = (f"{d.valid_file} ({vstats.examples} examples)" if d.valid_file else
             f"{vstats.examples} examples held out of the training file" if valid_set else "none")
    return train_set, valid_set, {"train_file": d.train_file, "examples": stats.examples, "format": stats.format,
                                  "truncated": stats.truncated, "dropped": stats.dropped, "tokens": stats.tokens,
                                  "trained_tokens": stats.trained_tokens, "valid": valid,
                                  "blocks": len(train_set) if d.packing else None}


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for 0-based step ``step``: linear warmup over ``warmup`` steps,
    then cosine / linear decay to ``min_ratio`` at ``total``, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return min_ratio + (1.0 - min_ratio) * shape


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 autocast on a CUDA device that supports it, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def progress_bar(start: int, total: int, enabled: bool):
    """A tqdm bar (loss, tokens/s, ETA) or a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["train", "TrainResult", "TrainingError", "train_step", "causal_lm_loss", "evaluate", "lr_factor",
           "prepare_data", "guarded_step", "split_head"]
