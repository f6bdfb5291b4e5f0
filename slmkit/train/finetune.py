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

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slmkit.errors import ConfigError
from slmkit.step import Corpus, StepResult, cli
from slmkit.train.config import TrainConfig
from slmkit.train.run import Job


class FinetuneConfig(TrainConfig):
    """Options of ``slm finetune``: every ``slm train`` option plus the method and adapter.

    Defaults differ from pretraining where fine-tuning wants it: a smaller learning rate,
    a short warm-up, no weight decay, and no held-out split of the (usually small) task file.
    """

    model: str = Field(description="Model dir to fine-tune.",
                       json_schema_extra=cli(argument=True))
    data: Corpus = Field(description="Task JSONL with prompt/completion or chat messages "
                         "rows (OpenAI format, tool calls and results with a 'tools' list "
                         "included), an `slm augment` output dir, or a built-in task "
                         "(stdlib-docstring, stdlib-funcname, stdlib-nextline, "
                         "function-calling: its train split); repeatable.",
                         json_schema_extra=cli(short="-d"))
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many "
                                    "samples (first rows / mined items).")
    method: Literal["lora", "qlora", "full"] = Field(
        default="lora", description="lora (peft adapters), qlora (LoRA over a 4-bit "
        "QuantLinear base, merged at the end) or full.")
    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (update scale alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt, comma-separated or repeated "
        "(default: all attention and MLP projections).")
    merge: bool = Field(default=False, description="Write a merged dense model instead of an "
                        "adapter.")
    requantize: bool = Field(default=False, description="QLoRA: re-quantize the merged model "
                             "to 4 bit and print the loss it costs.")
    pack: bool = Field(default=False, description="Pack several samples per sequence.")
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto", description="chat (the tokenizer's chat template), plain (prompt + "
        "completion + eos, for raw-prompt tasks) or auto (plain for built-in tasks and "
        "augment outputs made from one, chat otherwise).")

    seq_len: int = Field(default=256, ge=8, description="Context per sample (longer samples "
                         "are refused).")
    batch_size: int = Field(default=8, ge=1, description="Samples per micro-batch.")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decay (matrices only).")
    val_fraction: float = Field(default=0.0, ge=0, lt=1, description="Share of documents "
                                "held out.")
    checkpoint_every: int = Field(default=50, ge=1, description="Checkpoint every N steps.")
    seed: int = Field(default=0, description="Seed for adapters and data order.")

    @field_validator("target_modules")
    @classmethod
    def _split(cls, v: list[str] | None) -> list[str] | None:
        """``["q_proj,v_proj"]`` (the CLI's comma form) -> ``["q_proj", "v_proj"]``."""
        if v is None:
            return v
        names = [t.strip() for item in v for t in item.split(",") if t.strip()]
        if not names:
            raise ValueError("name at least one module, e.g. q_proj,v_proj")
        return names

    @model_validator(mode="after")
    def _method_options(self) -> "FinetuneConfig":
        if self.method != "lora" and self.merge:
            raise ValueError("--merge applies to --method lora only (qlora always merges); "
                             "drop --merge")
        if self.requantize and self.method != "qlora":
            raise ValueError("--requantize applies to --method qlora only; drop --requantize")
        if self.distributed == "fsdp" and self.method != "full":
            raise ValueError("--distributed fsdp applies to --method full (LoRA and QLoRA train "
                             "small adapters on a frozen base, which ddp replicates); drop it")
        return self


def run_finetune(cfg: FinetuneConfig) -> StepResult:
    """``slm finetune``: LoRA, QLoRA or full fine-tuning on a task set, in the one loop."""
    from slmkit.models.presets import PRESETS
    from slmkit.train.run import drive

    if cfg.model in PRESETS:
        raise ConfigError(f"--model {cfg.model} is a preset; fine-tune a trained model dir.")
    return drive(cfg, "finetune", f"finetune {cfg.model} ({cfg.method}) on {cfg.data}",
                 _sft_job)


def _sft_job(cfg: FinetuneConfig, out: Path) -> Job:
    import torch

    from slmkit.models.io import resolve_ref
    from slmkit.train.lora import (apply_lora, apply_qlora, merge_lora, merge_qlora,
                                   trainable_fraction)
    from slmkit.train.objectives import LMObjective
    from slmkit.train.run import check_context, load_model_and_tokenizer
    from slmkit.train.sft import SFTBatches, load_sft_examples
    from slmkit.train.task_data import default_template

    model, tok = load_model_and_tokenizer(cfg)
    check_context(model, cfg.seq_len)
    if cfg.template == "auto":                   # the lineage records what was used
        cfg.template = default_template(cfg.data)
    examples = load_sft_examples(cfg.data, tok, cfg.seq_len, cfg.template, cfg.max_samples)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = SFTBatches(examples, cfg.seq_len, cfg.batch_size, pad_id, seed=cfg.seed,
                         pack=cfg.pack)

    torch.manual_seed(cfg.seed)
    total = trainable_fraction(model)[1]          # before QLoRA turns weights into buffers
    scheme = None
    if cfg.method == "lora":
        model = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
        model.peft_config["default"].base_model_name_or_path = str(resolve_ref(cfg.model))
    elif cfg.method == "qlora":
        scheme = _quantize_base(model, tok)
        apply_qlora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    trainable = trainable_fraction(model)[0]

    def finish(state):
        final = model
        extra: dict[str, Any] = {}
        rows = []
        if cfg.method == "lora" and cfg.merge:
            final = merge_lora(model)
        if cfg.method == "qlora":
            final = merge_qlora(model)
            for attr in ("slmkit", "quantization_config"):       # the merged model is dense
                if hasattr(final.config, attr):
                    delattr(final.config, attr)
            if cfg.requantize:
                extra = _requantize(final, tok, batches, scheme)
                rows.append(("re-quantize cost",
                             f"SFT loss {extra['sft_loss_dense']:.4f} -> "
                             f"{extra['sft_loss_requantized']:.4f} "
                             f"(+{extra['requantize_loss_cost']:.4f})"))
        extra |= {"samples": len(examples), "trainable_params": trainable,
                  "trainable_fraction": trainable / total}
        return final, extra, rows

    kind = {"lora": "merged dense model" if cfg.merge else "peft adapter",
            "qlora": "4-bit re-quantized model" if cfg.requantize else
            "dense model (merged into the dequantized 4-bit base)"}.get(cfg.method, "dense model")
    rows = [("method", f"{cfg.method}" + (f" r={cfg.rank} alpha={cfg.alpha:g}"
                                          if cfg.method != "full" else "")),
            ("samples", f"{len(examples)} ({cfg.template} template)"),
            ("trainable", f"{trainable:,} / {total:,} ({trainable / total:.2%})"),
            ("output", kind)]
    return Job(model, tok, LMObjective(), batches, params=total, rows=rows, finish=finish,
               curve=False)


def _quantize_base(model, tok):
    """Quantize the base's linears to 4 bit (RTN, symmetric) in place for QLoRA, with
    ``slm quantize``'s default group (the largest of 128/64/32 dividing every layer)."""
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import make_config

    # QLoRA quantizes the frozen linears; the embedding table stays as it is
    options = make_config(method="rtn", bits=4, sym=True, quantize_embeddings=False)
    quantize_model(model, tok, options)
    return dict(method="rtn", bits=4, group_size=options.group_size, sym=True)


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
    quantize_model(model, tok, make_config(**{"quantize_embeddings": False, **scheme}))
    quant = _sft_loss(model, batches)
    return {"sft_loss_dense": dense, "sft_loss_requantized": quant,
            "requantize_loss_cost": quant - dense}
