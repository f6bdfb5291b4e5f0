"""``slm finetune``: LoRA or full supervised fine-tuning on a task JSONL, in the one loop.

The objective is the loop's :class:`~slmkit.train.objectives.LMObjective`; the batches are
:class:`~slmkit.train.sft.SFTBatches` (chat-template formatted, prompt tokens masked).
Budgets, bf16, checkpoints and ``--resume`` are the loop's own.

Output:

* ``--method lora``: a peft adapter dir (``adapter_config.json``,
  ``adapter_model.safetensors``, tokenizer, ``slmkit.json`` lineage) that plain
  ``peft.PeftModel.from_pretrained(base, out)`` loads; its ``base_model_name_or_path`` is
  the base model dir.
* ``--method lora --merge`` and ``--method full``: a dense model dir that plain
  transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slmkit.errors import ConfigError
from slmkit.train.config import TrainConfig
from slmkit.train.run import TrainResult


class FinetuneConfig(TrainConfig):
    """Options of ``slm finetune``: every ``slm train`` option plus the method and adapter.

    Defaults differ from pretraining where fine-tuning wants it: a smaller learning rate,
    a short warm-up, no weight decay, and no held-out split of the (usually small) task file.
    """

    data: str | list[str] = Field(description="task JSONL (prompt/completion or messages "
                                  "rows), an `slm augment` output dir, or a built-in task "
                                  "(stdlib-docstring, ...; its train split)")
    max_samples: int | None = Field(default=None, ge=1, description="use at most this many "
                                    "samples (the first rows / items)")
    method: Literal["lora", "qlora", "full"] = "lora"
    rank: int = Field(default=8, ge=1, description="LoRA rank r")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (scale alpha / r)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        default=None, description="module names to adapt (default: attention + MLP projections)")
    merge: bool = Field(default=False, description="write a merged dense model (LoRA; QLoRA "
                        "always merges into the dequantized base)")
    requantize: bool = Field(default=False, description="QLoRA: re-quantize the merged model "
                             "to 4 bit and record the SFT loss it costs")
    pack: bool = Field(default=False, description="pack several samples per sequence")
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto", description="chat: the tokenizer's chat template; plain: prompt + "
        "completion + eos (tasks scored on raw prompts); auto: plain for built-in tasks "
        "and augment outputs made from one, chat otherwise")

    seq_len: int = Field(default=256, ge=8)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    val_fraction: float = Field(default=0.0, ge=0, lt=1)
    checkpoint_every: int = Field(default=50, ge=1)


@dataclass
class FinetuneResult(TrainResult):
    """A :class:`TrainResult` plus the fine-tuning facts."""

    ft_rows: list[tuple[str, Any]] | None = None

    def summary_rows(self) -> list[tuple[str, Any]]:
        rows = [r for r in super().summary_rows() if r[0] not in ("loss curve",)]
        return [*(self.ft_rows or []), *rows]


def _check_context(model, cfg: FinetuneConfig) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None) or \
        getattr(model.config, "n_positions", None)
    if max_pos and cfg.seq_len > max_pos:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's context of {max_pos} "
                          "tokens; lower --seq-len.")


def run_finetuning(cfg: FinetuneConfig) -> FinetuneResult:
    """Run ``slm finetune`` end to end and return what it measured.

    Raises:
        ConfigError, DataError, ModelLoadError, OutputError: bad options or inputs, each a
        one-sentence message; no output dir is left half-written.
    """
    import torch

    from slmkit.console import log
    from slmkit.models.io import resolve_ref
    from slmkit.models.presets import PRESETS
    from slmkit.train import checkpoint as ckpt
    from slmkit.train.lora import (apply_lora, apply_qlora, merge_lora, merge_qlora,
                                   trainable_fraction)
    from slmkit.train.loop import Trainer
    from slmkit.train.objectives import LMObjective
    from slmkit.train.run import finish_run, load_model_and_tokenizer, prepare_out
    from slmkit.train.sft import SFTBatches, load_sft_examples
    from slmkit.train.task_data import default_template

    if cfg.model in PRESETS:
        raise ConfigError(f"--model {cfg.model} is a preset; fine-tune a trained model dir.")
    if cfg.method != "lora" and cfg.merge:
        raise ConfigError("--merge applies to --method lora only (qlora always merges); drop "
                          "--merge.")
    if cfg.requantize and cfg.method != "qlora":
        raise ConfigError("--requantize applies to --method qlora only; drop --requantize.")
    out, ck_root = prepare_out(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model_and_tokenizer(cfg)
    _check_context(model, cfg)
    if cfg.template == "auto":                   # the lineage records what was used
        cfg = cfg.model_copy(update={"template": default_template(cfg.data)})
    template = cfg.template
    examples = load_sft_examples(cfg.data, tok, cfg.seq_len, template, cfg.max_samples)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = SFTBatches(examples, cfg.seq_len, cfg.batch_size, pad_id, seed=cfg.seed,
                         pack=cfg.pack)

    torch.manual_seed(cfg.seed)
    total = trainable_fraction(model)[1]          # before QLoRA turns weights into buffers
    if cfg.method == "lora":
        model = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
        model.peft_config["default"].base_model_name_or_path = str(resolve_ref(cfg.model))
    elif cfg.method == "qlora":
        scheme = _quantize_base(model, tok)
        apply_qlora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    trainable = trainable_fraction(model)[0]
    trainer = Trainer(model, LMObjective(), batches, cfg, checkpoint_root=ck_root)
    latest = ckpt.latest_checkpoint(ck_root) if cfg.resume else None
    if latest is not None:
        trainer.resume(latest)
    log.info("fine-tuning %s (%s, %d samples, %s of %s params trainable)", cfg.model,
             cfg.method, len(examples), f"{trainable:,}", f"{total:,}")
    state = trainer.fit()

    if cfg.method == "lora" and cfg.merge:
        model = merge_lora(model)
    extra: dict[str, Any] = {}
    if cfg.method == "qlora":
        model = merge_qlora(model)
        for attr in ("slmkit", "quantization_config"):       # the merged model is dense
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        if cfg.requantize:
            extra = _requantize(model, tok, batches, scheme)
    extra |= {"samples": len(examples), "trainable_params": trainable,
             "trainable_fraction": trainable / total}
    metrics = finish_run(cfg, model, tok, state, out, ck_root, step="finetune",
                         title=f"finetune {cfg.model} ({cfg.method}) on {cfg.data}",
                         extra=extra)
    kind = {"lora": "merged dense model" if cfg.merge else "peft adapter",
            "qlora": "4-bit re-quantized model" if cfg.requantize else
            "dense model (merged into the dequantized 4-bit base)"}.get(cfg.method, "dense model")
    rows = [("method", f"{cfg.method}" + (f" r={cfg.rank} alpha={cfg.alpha:g}"
                                          if cfg.method != "full" else "")),
            ("samples", f"{len(examples)} ({template} template)"),
            ("trainable", f"{trainable:,} / {total:,} ({trainable / total:.2%})"),
            ("output", kind)]
    if "requantize_loss_cost" in extra:
        rows.append(("re-quantize cost", f"SFT loss {extra['sft_loss_dense']:.4f} -> "
                                         f"{extra['sft_loss_requantized']:.4f} "
                                         f"(+{extra['requantize_loss_cost']:.4f})"))
    return FinetuneResult(out=Path(out), metrics=metrics, params=total,
                          precision=trainer.precision, skipped=[], ft_rows=rows)


def _quantize_base(model, tok):
    """Quantize the base's linears to 4 bit (RTN, symmetric) in place for QLoRA.

    The group size is the largest of 128/64/32 dividing every input width.
    """
    import torch

    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import make_config

    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 32)
    scheme = dict(method="rtn", bits=4, group_size=group, sym=True)
    quantize_model(model, tok, make_config(**scheme))
    return scheme


def _sft_loss(model, batches, n_batches: int = 8) -> float:
    """Mean completion-token loss over the first batches (the re-quantization yardstick)."""
    import torch

    from slmkit.train.objectives import LMObjective

    model.eval()
    n = min(n_batches, max(1, int(batches.epoch_batches + 0.999)))
    with torch.no_grad():
        return sum(float(LMObjective()(model, batches.batch(i))[0]) for i in range(n)) / n


def _requantize(model, tok, batches, scheme) -> dict[str, float]:
    """Re-quantize the merged model in place; return its SFT loss before and after."""
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import make_config

    dense = _sft_loss(model, batches)
    quantize_model(model, tok, make_config(**scheme))
    quant = _sft_loss(model, batches)
    return {"sft_loss_dense": dense, "sft_loss_requantized": quant,
            "requantize_loss_cost": quant - dense}


def run_finetune(cfg: FinetuneConfig, resume: bool = False) -> dict[str, Any]:
    """Recipe step entry point: fine-tune, return the measured figures."""
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    result = run_finetuning(cfg)
    return {**result.metrics, "params": result.params, "out": str(result.out)}
