"""The one training loop. Objectives (LM, distillation, SFT) plug in; the loop does not change.

``Trainer(model, objective, batches, cfg).fit()`` runs AdamW (decoupled decay on matrices
only) with warmup + cosine decay, gradient clipping and accumulation, optional bf16 autocast
over fp32 master weights, periodic validation, a live progress line (loss, tokens/s, MFU,
ETA) and atomic checkpoints that :meth:`Trainer.resume` continues from bit-exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmkit.console import log, progress
from slmkit.train import checkpoint as ckpt
from slmkit.train.batches import BatchSource
from slmkit.train.config import TrainConfig
from slmkit.train.distributed import Dist
from slmkit.train.objectives import IGNORE_INDEX, Objective
from slmkit.train.ops import (
    cosine_progress,
    lr_at,
    measured_peak_flops,
    param_groups,
    train_flops_per_token,
)


@dataclass
class TrainState:
    """Counters and history; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0            # seconds of training (evals and checkpoints included)
    history: list[dict] = field(default_factory=list)      # train records, one per log
    val_history: list[dict] = field(default_factory=list)  # one per evaluation


class Trainer:
    """State of one training run: model, objective, optimizer, counters and checkpoints.

    Args:
        model: the causal LM (fp32 parameters: the master weights).
        objective: ``objective(model, batch) -> (loss, metrics)``.
        batches: a :class:`BatchSource`; micro-batch ``i`` is ``batches.batch(i)``.
        cfg: the training config (budget, optimiser, precision, intervals).
        val_batches: fixed validation batches (None: no validation).
        val_bytes_per_token: UTF-8 bytes per target token of ``val_batches``, for
            bits-per-byte.
        checkpoint_root: folder for checkpoints (None: no checkpoints).
        dist: this process' rank in a torchrun job (None: one process); see
            :mod:`slmkit.train.distributed`. Each rank trains its rows of every micro-batch
            through DistributedDataParallel; counters, logged metrics and validation are
            global (summed over the ranks), so every rank takes the same decisions.
    """

    def __init__(self, model: torch.nn.Module, objective: Objective, batches: BatchSource,
                 cfg: TrainConfig, val_batches: list[dict] | None = None,
                 val_bytes_per_token: float | None = None,
                 checkpoint_root: str | Path | None = None, dist: Dist | None = None):
        self.model, self.objective, self.batches, self.cfg = model, objective, batches, cfg
        self.dist = dist or Dist()
        self.val_batches, self.val_bpt = val_batches or [], val_bytes_per_token
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.precision = cfg.resolved_precision()
        self.device = next(model.parameters()).device
        self.state = TrainState()
        self.flops_per_token = train_flops_per_token(model, cfg.seq_len)
        self.sharded = self.dist.active and cfg.distributed == "fsdp"
        self._model_class = type(model)           # before FSDP swaps in its subclass
        # DDP wraps the model; FSDP shards it in place (so before the optimizer sees it)
        self.ddp = self.dist.wrap(model, cfg.distributed)  # the model itself in one process
        self.optimizer = self._build_optimizer()
        self.eval_model = torch.compile(model) if cfg.compile else model
        self.forward_model = (torch.compile(self.ddp) if cfg.compile and self.dist.active
                              and not self.sharded
                              else self.ddp if self.dist.active and not self.sharded
                              else self.eval_model)
        self._peak = None

    # ------------------------------------------------------------------ set-up

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.cfg.weight_decay)
        kwargs = dict(lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=1e-8)
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):   # fused kernel unavailable for this device/dtype
            return torch.optim.AdamW(groups, foreach=True, **kwargs)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def peak_flops(self) -> float:
        if self._peak is None:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self._peak = measured_peak_flops(dtype, self.device.type)
        return self._peak

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint dir: weights, optimizer, RNG, counters and history
        (a sharded model reads the same files: every rank loads its shards from them)."""
        if self.sharded:
            data = self._load_sharded(Path(path))
        else:
            data = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.state = TrainState(**data["state"])
        log.info("resumed from %s (step %d, %s tokens)", path, self.state.step,
                 f"{self.state.tokens:,}")

    # ------------------------------------------------------------------ budget and schedule

    def _progress(self) -> float:
        """Share of the budget spent (the max over the step, token and time budgets)."""
        cfg, s = self.cfg, self.state
        parts = []
        if cfg.max_steps:
            parts.append(s.step / cfg.max_steps)
        if cfg.max_tokens:
            parts.append(s.tokens / cfg.max_tokens)
        if cfg.max_minutes:
            parts.append(s.elapsed / (cfg.max_minutes * 60))
        return max(parts)

    def _lr(self) -> float:
        total = self.cfg.total_steps()
        if total is not None:
            p = cosine_progress(self.state.step, self.cfg.warmup_steps, total)
        else:  # time budget only: decay over the wall-clock budget
            p = self.state.elapsed / (self.cfg.max_minutes * 60)
        return lr_at(self.state.step, self.cfg.lr, self.cfg.warmup_steps, p,
                     self.cfg.min_lr_ratio)

    def done(self) -> bool:
        return self._progress() >= 1.0

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics.

        Each micro-batch loss is the mean over this rank's labelled tokens, scaled by
        :meth:`Dist.loss_scale` so the gradient DDP averages is that of the whole
        micro-batch's token mean (the scale is exactly 1 in one process). The returned
        metrics and token count are the whole job's.
        """
        cfg, model, d = self.cfg, self.model, self.dist
        model.train()
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first = self.state.step * cfg.grad_accum
        micro_batches = [d.shard(self.batches.batch(first + m)) for m in range(cfg.grad_accum)]
        counts = torch.tensor([int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches],
                              dtype=torch.float64)                       # [grad_accum]
        totals = d.sum(counts)
        sums: dict[str, float] = {}
        for micro, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scale = d.loss_scale(int(counts[micro]), float(totals[micro]))
            last_micro = micro == cfg.grad_accum - 1
            if self.sharded:                  # FSDP reduces gradients on the last micro only
                model.set_requires_gradient_sync(last_micro)
            sync = (self.ddp.no_sync() if d.active and not self.sharded and not last_micro
                    else contextlib.nullcontext())
            with sync, d.guard():
                with self.autocast():
                    loss, metrics = self.objective(self.forward_model, batch)
                if not counts[micro]:         # no labelled token on this rank: no gradient
                    loss = loss.nan_to_num(0.0)
                (loss * scale / cfg.grad_accum).backward()
            share = float(counts[micro] / totals[micro]) if d.active and totals[micro] else 1.0
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * share / cfg.grad_accum
        if d.active:
            keys = sorted(sums)
            reduced = d.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
            sums = {k: float(v) for k, v in zip(keys, reduced)}
        if cfg.grad_clip > 0:
            with d.guard():
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if hasattr(norm, "full_tensor"):  # a sharded model's norm is a DTensor
                norm = norm.full_tensor()
            sums["grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(totals.sum())
        self.state.step += 1
        self.state.tokens += tokens
        return {**sums, "lr": lr, "tokens": tokens}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss, perplexity and bits per byte on ``val_batches``
        (each rank evaluates every N-th batch; the sums are the job's)."""
        self.model.eval()
        d = self.dist
        total, count = 0.0, 0
        # DDP: rank r evaluates every N-th batch; FSDP: every rank runs every batch (each
        # forward gathers the shards, so all ranks must run the same forwards)
        mine = self.val_batches if self.sharded else self.val_batches[d.rank::d.world_size]
        for batch in mine:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                loss, _ = self.objective(self.eval_model, batch)
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += float(loss) * n
            count += n
        if d.active and not self.sharded:
            total, count = (float(v) for v in d.sum(torch.tensor([total, count],
                                                                 dtype=torch.float64)))
        loss = total / max(count, 1)
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.val_bpt:
            out["val_bpb"] = loss / math.log(2) / self.val_bpt
        return out

    def fit(self, until_step: int | None = None) -> TrainState:
        """Train until the budget is spent; validate and checkpoint on their intervals.

        Args:
            until_step: pause after this step (checkpointing there) even though budget is
                left; a later :meth:`resume` + :meth:`fit` continues on the same schedule.
        """
        cfg, s = self.cfg, self.state
        total = cfg.total_steps()
        start_time, start_elapsed = time.perf_counter(), s.elapsed
        window: list[dict] = []
        window_t = 0.0      # seconds spent in train steps (not evals/checkpoints) this window
        window_tokens, speed, mfu = 0, 0.0, 0.0
        with progress("training", total) as update:
            if s.step:
                update(s.step)
            while not self.done() and (until_step is None or s.step < until_step):
                t0 = time.perf_counter()
                metrics = self.train_step()
                window_t += time.perf_counter() - t0
                s.elapsed = start_elapsed + time.perf_counter() - start_time
                if self.dist.active and cfg.max_minutes:   # rank 0's clock decides for all
                    s.elapsed = self.dist.broadcast_float(s.elapsed)
                window.append(metrics)
                window_tokens += metrics["tokens"]
                last = self.done() or s.step == until_step
                if s.step % cfg.log_every == 0 or last:
                    speed = window_tokens / max(window_t, 1e-9)
                    mfu = (speed * self.flops_per_token
                           / (self.peak_flops() * self.dist.world_size)
                           if self.dist.is_main else 0.0)
                    record = {"step": s.step, "tokens": s.tokens, "elapsed": round(s.elapsed, 3),
                              "tokens_per_s": speed, "mfu": mfu}
                    for k in window[0]:
                        if k != "tokens":
                            record[k] = sum(m[k] for m in window) / len(window)
                    s.history.append(record)
                    window, window_t, window_tokens = [], 0.0, 0
                if self.val_batches and (s.step % cfg.eval_every == 0 or last):
                    s.val_history.append({"step": s.step, "tokens": s.tokens,
                                          "elapsed": round(s.elapsed, 3), **self.evaluate()})
                    self._log_eval(speed, mfu)
                if self.checkpoint_root and (s.step % cfg.checkpoint_every == 0 or last):
                    self.save_checkpoint()
                update(1, info=self._info(speed, mfu))
        return s

    def _log_eval(self, speed: float, mfu: float) -> None:
        """One log line per evaluation (what a non-interactive log file keeps)."""
        s, v = self.state, self.state.val_history[-1]
        bpb = f", {v['val_bpb']:.3f} bits/byte" if "val_bpb" in v else ""
        log.info("step %d (%s tokens, %.1f min): val loss %.4f, ppl %.2f%s; %s tok/s, MFU "
                 "%.1f%%", s.step, f"{s.tokens:,}", s.elapsed / 60, v["val_loss"],
                 v["val_ppl"], bpb, f"{speed:,.0f}", 100 * mfu)

    def _info(self, speed: float, mfu: float) -> str:
        s = self.state
        loss = s.history[-1]["loss"] if s.history and "loss" in s.history[-1] else float("nan")
        parts = [f"loss {loss:.3f}"]
        if s.val_history:
            parts.append(f"val {s.val_history[-1]['val_loss']:.3f}")
        parts += [f"{speed:,.0f} tok/s", f"MFU {mfu:.1%}"]
        p = self._progress()
        if self.cfg.total_steps() is None and p > 0:
            parts.append(f"eta {s.elapsed * (1 - p) / p:,.0f}s")
        return " · ".join(parts)

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``checkpoint_root/step-N``; a sharded model first gathers its full
        weights and optimizer state there (every rank takes part), so the files are the
        ones a one-process run writes."""
        model, optim_state = self.model, None
        if self.sharded:
            model, optim_state = self.gather()
        if not self.dist.is_main:
            return None
        state = {"state": asdict(self.state), "config": self.cfg.model_dump(mode="json")}
        return ckpt.save_checkpoint(self.checkpoint_root, model, self.optimizer, state,
                                    self.state.step, self.cfg.keep_checkpoints,
                                    optimizer_state=optim_state)

    # ------------------------------------------------------------------ FSDP

    def gather(self) -> tuple[torch.nn.Module | None, dict | None]:
        """A sharded model's full weights as a plain model, and its optimizer state in
        ``optimizer.state_dict()`` form, on rank 0 (None, None elsewhere). Collective."""
        from slmkit.train import distributed as dd

        with self.dist.guard():
            model_sd, optim_sd = dd.gather_full_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return None, None
        with torch.device("meta"):
            dense = self._model_class(self.model.config)
        dense.to_empty(device="cpu")
        dense.load_state_dict(model_sd, strict=False)
        if hasattr(dense, "tie_weights"):
            dense.tie_weights()
        buffers = dict(self.model.named_buffers())      # FSDP leaves buffers whole
        with torch.no_grad():
            for name, buf in dense.named_buffers():
                buf.copy_(buffers[name])
        if getattr(self.model, "generation_config", None) is not None:
            dense.generation_config = self.model.generation_config
        names = dd.optimizer_names(self.model, self.optimizer)
        return dense.eval(), dd.optimizer_state_by_index(optim_sd, names)

    def _load_sharded(self, path: Path) -> dict:
        from safetensors.torch import load_file

        from slmkit.train import distributed as dd

        model_sd = load_file(str(path / "model.safetensors"))
        blob = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
        names = dd.optimizer_names(self.model, self.optimizer)
        with self.dist.guard():
            dd.load_full_state(self.model, self.optimizer, model_sd,
                               dd.optimizer_state_by_name(blob["optimizer"], names))
        torch.set_rng_state(blob["torch_rng"])
        return json.loads((path / "state.json").read_text())
