"""The ``slm`` command line: verbs -> library functions.

Thin by design: parse options, call the library, print a table. Every user error is an
``SlmError``, printed as one line on stderr with exit code 2 (``--debug`` shows the
traceback). Heavy imports (torch, transformers) happen inside the verbs so that
``slm --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from slmkit import __version__
from slmkit.console import configure, console, human_bytes, human_count, print_table
from slmkit.errors import SlmError

app = typer.Typer(
    name="slm", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="slmkit: build, shrink, serve and watch small language models on your own hardware.",
    context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        console.print(f"slmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print results and errors."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    configure(quiet=quiet, debug=debug)


# --------------------------------------------------------------------------- model basics

@app.command()
def init(
    preset: str = typer.Option(..., "--preset", "-p",
                               help="nano, micro, small, base, micro-swa or micro-moe."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer (or model) dir."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config field: "
                                             "key=value (repeatable)."),
    seed: int = typer.Option(0, help="Random seed for the initial weights."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Create a randomly initialised model from a preset."""
    from slmkit.models.presets import InitConfig, parse_overrides, run_init

    cfg = InitConfig(preset=preset, tokenizer=str(tokenizer), out=str(out),
                     set=parse_overrides(set_), seed=seed, overwrite=overwrite)
    res = run_init(cfg)
    rows = [("preset", preset), ("architecture", res["architecture"]),
            ("parameters", f"{res['params']:,} ({human_count(res['params'])})")]
    if res["active_params"] != res["params"]:
        rows.append(("active per token",
                     f"{res['active_params']:,} ({human_count(res['active_params'])})"))
    rows += [("size on disk", human_bytes(res["size_on_disk"])), ("written to", res["out"])]
    print_table("slm init", rows)


@app.command()
def info(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Show a model's architecture, size, compression state and lineage."""
    from slmkit.models.info import model_info

    data = model_info(model)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    rows = [("path", data["path"]), ("architecture", data["architecture"]),
            ("parameters", f"{data['params']:,} ({human_count(data['params'])})")]
    if data["active_params"] != data["params"]:
        rows.append(("active per token", f"{data['active_params']:,}"))
    rows += [("dtype", data["dtype"]), ("layers × hidden", f"{data['layers']} × "
                                         f"{data['hidden_size']}"),
             ("vocabulary", data["vocab_size"]), ("context", data["context"]),
             ("size on disk", human_bytes(data["size_on_disk"])), ("format", data["format"])]
    for key, value in (data["compression"] or {}).items():
        if key == "format":
            continue
        if isinstance(value, dict) and len(value) > 4:   # per-layer detail: --json has it
            value = f"{len(value)} layers (slm info --json lists them)"
        rows.append((f"  {key}", json.dumps(value) if isinstance(value, (dict, list))
                     else value))
    if data.get("sparsity"):
        rows.append(("sparsity", f"{data['sparsity']:.1%}"))
    print_table("slm info", rows)
    chain = data["lineage"]
    print_table("lineage (oldest first)", [
        (str(i), e.get("step") or "?", e.get("ref") or "", _short(e.get("params")),
         _short(e.get("metrics")), (e.get("created_utc") or "")[:16].replace("T", " "))
        for i, e in enumerate(chain)], header=("#", "step", "model", "params", "metrics", "utc"))


def _short(d: dict | None, limit: int = 60) -> str:
    if not d:
        return ""
    text = ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- tokenizer, train

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    data: list[str] = typer.Option(["stdlib"], "--data", "-d", help="Corpus: 'stdlib', a file, "
                                   "dir, glob or .jsonl (repeatable)."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Total vocabulary size."),
    out: Path = typer.Option(..., "--out", "-o", help="Output tokenizer directory."),
    val_fraction: float = typer.Option(0.05, help="Share of documents held out to measure "
                                       "bytes per token."),
    min_frequency: int = typer.Option(2, help="Minimum pair count for a merge."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Train a byte-level BPE tokenizer (GPT-2 regex, bos/eos/pad, ChatML template)."""
    from slmkit.models.tokenizer import train_tokenizer_on_corpus

    spec = data[0] if len(data) == 1 else data
    res = train_tokenizer_on_corpus(spec, vocab_size, out, val_fraction=val_fraction,
                                    min_frequency=min_frequency, overwrite=overwrite)
    val = res["val"]
    rows = [("vocabulary", res["vocab_size"]), *res["train"].summary_rows()]
    if val:
        rows.append(("val bytes/token", f"{val['bytes_per_token']:.3f}  ({val['documents']:,} "
                                        f"docs, {val['tokens']:,} tokens)"))
    rows.append(("written to", res["out"]))
    print_table("slm tokenizer train", rows)


@app.command()
def train(
    model: str = typer.Option(..., "--model", "-m", help="Preset (nano, micro, ...) or model "
                              "dir for continued pretraining."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="Tokenizer dir "
                                             "(required with a preset)."),
    data: list[str] = typer.Option(["stdlib"], "--data", "-d", help="Corpus: 'stdlib', a "
                                   "file, dir, glob or .jsonl (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many training tokens."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
    seq_len: int = typer.Option(256, help="Tokens per training sequence."),
    batch_size: int = typer.Option(16, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    warmup_steps: int = typer.Option(50, help="Linear warmup steps."),
    weight_decay: float = typer.Option(0.1, help="AdamW decay (matrices only)."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradient norm (0 = off)."),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (default: bf16 where "
                                            "the CPU supports it)."),
    val_fraction: float = typer.Option(0.05, help="Share of documents held out."),
    eval_every: int = typer.Option(100, help="Validate every N steps."),
    checkpoint_every: int = typer.Option(100, help="Checkpoint every N steps."),
    keep_checkpoints: int = typer.Option(2, help="Keep the last K checkpoints."),
    seed: int = typer.Option(0, help="Seed for init, data order and dropout."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
) -> None:
    """Pretrain (or continue pretraining) a causal LM with the LM objective."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.run import run_training

    cfg = TrainConfig.from_cli(
        model=model, tokenizer=str(tokenizer) if tokenizer else None,
        data=data[0] if len(data) == 1 else data, out=str(out), max_steps=max_steps,
        max_tokens=max_tokens, max_minutes=max_minutes, seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, precision=precision,
        val_fraction=val_fraction, eval_every=eval_every, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, seed=seed, resume=resume, overwrite=overwrite,
        compile=compile_)
    result = run_training(cfg)
    print_table("slm train", result.summary_rows())


# --------------------------------------------------------------------------- distill

@app.command()
def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model dir (any format, "
                                "quantized included)."),
    student: str = typer.Option(..., "--student", "-s", help="Preset (fresh init), a pruned "
                                "teacher (`slm prune --structured`) or any model dir with the "
                                "teacher's tokenizer."),
    data: list[str] = typer.Option(["stdlib"], "--data", "-d", help="Corpus: 'stdlib', a "
                                   "file, dir, glob or .jsonl (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    loss: str = typer.Option("fkl", help="fkl (forward KL), rkl (reverse KL, MiniLLM) or jsd "
                             "(generalised JSD, GKD)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of both models."),
    alpha: float = typer.Option(0.5, help="Weight of the plain LM loss (KD gets 1 - alpha)."),
    beta: float = typer.Option(0.5, help="JSD mixture weight on the teacher, in (0, 1)."),
    topk_cache: Optional[int] = typer.Option(None, "--topk-cache", help="Cache the teacher's "
                                             "top-K log-probs on disk; later epochs skip it."),
    topk_cache_dir: Optional[Path] = typer.Option(None, "--topk-cache-dir", help="Keep the "
                                                  "top-K cache here and reuse it across runs."),
    on_policy_fraction: float = typer.Option(0.0, help="Share of batches whose second half "
                                             "the student samples (GKD on-policy)."),
    chunk_size: int = typer.Option(1024, help="Positions per vocabulary-projection chunk."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many training tokens."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
    seq_len: int = typer.Option(256, help="Tokens per training sequence."),
    batch_size: int = typer.Option(16, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (lower it for pruned students)."),
    warmup_steps: int = typer.Option(50, help="Linear warmup steps."),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (default: bf16 where "
                                            "the CPU supports it)."),
    val_fraction: float = typer.Option(0.05, help="Share of documents held out."),
    eval_every: int = typer.Option(100, help="Validate every N steps."),
    checkpoint_every: int = typer.Option(100, help="Checkpoint every N steps."),
    seed: int = typer.Option(0, help="Seed for init, data order and sampling."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Distill a teacher into a student (KD objective in the training loop)."""
    from slmkit.train.distill import DistillConfig, run_distillation

    cfg = DistillConfig.from_cli(
        teacher=teacher, student=student, data=data[0] if len(data) == 1 else data,
        out=str(out), loss=loss, temperature=temperature, alpha=alpha, beta=beta,
        topk_cache=topk_cache, on_policy_fraction=on_policy_fraction, chunk_size=chunk_size,
        topk_cache_dir=str(topk_cache_dir) if topk_cache_dir else None,
        max_steps=max_steps, max_tokens=max_tokens, max_minutes=max_minutes, seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
        precision=precision, val_fraction=val_fraction, eval_every=eval_every,
        checkpoint_every=checkpoint_every, seed=seed, resume=resume, overwrite=overwrite)
    result = run_distillation(cfg)
    print_table("slm distill", result.summary_rows())


@app.command()
def finetune(
    model: str = typer.Argument(..., help="Model dir to fine-tune."),
    data: list[str] = typer.Option(..., "--data", "-d", help="Task JSONL with prompt/"
                                   "completion or chat messages rows, an `slm augment` output "
                                   "dir, or a built-in task (stdlib-docstring, "
                                   "stdlib-funcname, stdlib-nextline: its train split); "
                                   "repeatable."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir (adapter or model)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use at most this "
                                              "many samples (first rows / mined items)."),
    method: str = typer.Option("lora", help="lora (peft adapters), qlora (LoRA over a 4-bit "
                               "QuantLinear base, merged at the end) or full."),
    rank: int = typer.Option(8, help="LoRA rank r."),
    alpha: float = typer.Option(16.0, help="LoRA alpha (update scale alpha / r)."),
    dropout: float = typer.Option(0.0, help="LoRA dropout."),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="Comma-"
                                                 "separated module names (default: all "
                                                 "attention and MLP projections)."),
    merge: bool = typer.Option(False, help="Write a merged dense model instead of an adapter."),
    requantize: bool = typer.Option(False, help="QLoRA: re-quantize the merged model to 4 bit "
                                    "and print the loss it costs."),
    pack: bool = typer.Option(False, help="Pack several samples per sequence."),
    template: str = typer.Option("auto", help="chat (the tokenizer's chat template), plain "
                                 "(prompt + completion + eos, for raw-prompt tasks) or auto "
                                 "(plain for built-in tasks, chat for JSONL)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many trained tokens."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
    seq_len: int = typer.Option(256, help="Context per sample (longer samples are refused)."),
    batch_size: int = typer.Option(8, help="Samples per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    warmup_steps: int = typer.Option(10, help="Linear warmup steps."),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (default: bf16 where "
                                            "the CPU supports it)."),
    checkpoint_every: int = typer.Option(50, help="Checkpoint every N steps."),
    seed: int = typer.Option(0, help="Seed for adapters and data order."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Fine-tune on a task JSONL: LoRA adapters (peft) or full, loss on completions only."""
    from slmkit.train.finetune import FinetuneConfig, run_finetuning

    targets = [t.strip() for t in target_modules.split(",") if t.strip()] \
        if target_modules else None
    cfg = FinetuneConfig.from_cli(
        model=model, data=data[0] if len(data) == 1 else data, out=str(out), method=method,
        rank=rank, alpha=alpha, dropout=dropout, target_modules=targets, merge=merge,
        pack=pack, template=template, requantize=requantize, max_samples=max_samples,
        max_steps=max_steps,
        max_tokens=max_tokens,
        max_minutes=max_minutes,
        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, precision=precision, checkpoint_every=checkpoint_every,
        seed=seed, resume=resume, overwrite=overwrite)
    result = run_finetuning(cfg)
    print_table("slm finetune", result.summary_rows())


@app.command()
def augment(
    model: str = typer.Argument(..., help="Teacher model dir."),
    data: str = typer.Option(..., "--data", "-d", help="Task JSONL (prompt/completion rows), "
                             "an augment output dir, or a built-in task (stdlib-docstring, "
                             "...: its train split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir (gets data.jsonl)."),
    mode: str = typer.Option("completions", help="completions (new completions per prompt) or "
                             "paraphrase (rewritten prompts, original completion kept)."),
    n_per_sample: int = typer.Option(2, "--n-per-sample", "-n", help="Generations per row."),
    temperature: float = typer.Option(0.8, help="Sampling temperature."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus mass (1 = off)."),
    max_new_tokens: int = typer.Option(64, help="Tokens per new completion at most."),
    max_samples: Optional[int] = typer.Option(None, help="Augment only the first N rows."),
    min_length: int = typer.Option(1, help="Drop generations shorter than this (tokens)."),
    max_length: Optional[int] = typer.Option(None, help="Drop generations longer than this "
                                             "(tokens)."),
    min_logprob: Optional[float] = typer.Option(None, help="Drop rows whose completion has a "
                                                "lower mean log-prob per token under the "
                                                "teacher (e.g. -3)."),
    keep_original: bool = typer.Option(True, help="Write the original rows too."),
    template: str = typer.Option("auto", help="auto, chat or plain (as in slm finetune)."),
    batch_size: int = typer.Option(8, help="Concurrent generations."),
    seed: int = typer.Option(0, help="Sampling seed."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Expand a task set with a teacher: sample, filter (dedup, length, log-prob), write JSONL."""
    from slmkit.train.augment import make_augment_config, run_augment, summary_rows

    cfg = make_augment_config(
        model=model, data=data, out=str(out), mode=mode, n_per_sample=n_per_sample,
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        max_samples=max_samples, min_length=min_length, max_length=max_length,
        min_logprob=min_logprob, keep_original=keep_original, template=template,
        batch_size=batch_size, seed=seed, overwrite=overwrite)
    print_table("slm augment", summary_rows(run_augment(cfg)))


# --------------------------------------------------------------------------- recipes

@app.command("run")
def run_recipe_cmd(
    recipe: Path = typer.Argument(..., help="A YAML recipe (see recipes/)."),
    workdir: Optional[Path] = typer.Option(None, help="Override the recipe's workdir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; run nothing."),
    force: bool = typer.Option(False, help="Rerun every step, ignoring the cache."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a step option: "
                                             "step.field=value (repeatable)."),
) -> None:
    """Run a YAML recipe: a chain of steps, cached by config hash."""
    from slmkit.pipeline.recipe import load_recipe
    from slmkit.pipeline.runner import print_summary, run_recipe

    rec = load_recipe(recipe, workdir, overrides=set_)
    results = run_recipe(rec, dry_run=dry_run, force=force)
    print_summary(results, title=f"slm run {recipe}" + (" (dry run)" if dry_run else ""))


# --------------------------------------------------------------------------- quickstart

@app.command()
def quickstart(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Working directory "
                                       "(default runs/quickstart)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A real pretrained model "
                                        "(hub id or dir): run the compression and evaluation "
                                        "half on it instead."),
    mini: bool = typer.Option(False, "--mini", help="A miniature run with tiny budgets (to "
                              "check an installation in about two minutes)."),
    force: bool = typer.Option(False, help="Rerun every step, ignoring the cache."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; run nothing."),
) -> None:
    """Run the built-in end-to-end job on the stdlib corpus (what `make demo` runs)."""
    from slmkit.pipeline.quickstart import run_quickstart

    run_quickstart(out, model=model, mini=mini, force=force, dry_run=dry_run)


# --------------------------------------------------------------------------- quantize

@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    method: str = typer.Option("rtn", "--method", "-m", help="rtn, gptq or awq."),
    bits: int = typer.Option(4, "--bits", "-b", help="8 or 4 (3 is experimental)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="32, 64, 128 or "
                                             "-1 (per channel); default 128 for 4 bit, -1 "
                                             "for 8 bit."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric grid, or asymmetric with "
                             "zero points."),
    calib_data: str = typer.Option("stdlib", "--calib-data", help="Calibration corpus (train "
                                   "split): stdlib, a file, dir, glob or .jsonl."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    calib_seq_len: int = typer.Option(512, "--calib-seq-len", help="Tokens per window."),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help="Regex of linears to "
                                                "quantize (repeatable; default all)."),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help="Regex of linears to "
                                               "skip (repeatable; default lm_head)."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ relative Hessian dampening."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns in "
                                   "order of decreasing Hessian diagonal."),
    awq_clip: bool = typer.Option(True, "--awq-clip/--no-awq-clip", help="AWQ: search "
                                  "per-group clipping ratios."),
    preserve_zeros: bool = typer.Option(True, "--preserve-zeros/--no-preserve-zeros",
                                        help="GPTQ: weights that are exactly zero (pruned) "
                                        "stay zero."),
    quantize_embeddings: bool = typer.Option(False, "--quantize-embeddings", help="Also "
                                             "store the token embedding table quantized "
                                             "(RTN; a tied LM head shares the codes)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Instead: write a dense copy "
                                    "of a quantized MODEL (for tools that need one)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Quantize linear weights to int8 / int4 (RTN, GPTQ or AWQ), or --dequantize."""
    from slmkit.models.info import dir_size

    if dequantize:
        from slmkit.compress.quantize import dequantize as dequantize_dir

        final = dequantize_dir(model, out, overwrite=overwrite)
        print_table("slm quantize --dequantize", [
            ("input", model), ("size on disk", human_bytes(dir_size(final))),
            ("written to", str(final))])
        return
    from slmkit.compress.quantize import make_config, quantize as quantize_dir
    from slmkit.models.io import resolve_ref

    fields = dict(method=method, bits=bits, group_size=group_size, sym=sym,
                  calib_data=calib_data, calib_samples=calib_samples,
                  calib_seq_len=calib_seq_len, damp=damp, act_order=act_order,
                  awq_clip=awq_clip, preserve_zeros=preserve_zeros,
                  quantize_embeddings=quantize_embeddings)
    if targets:
        fields["targets"] = targets
    if ignore:
        fields["ignore"] = ignore
    cfg = make_config(**fields)
    summary = quantize_dir(model, out, cfg, overwrite=overwrite)
    src = dir_size(resolve_ref(model))
    rows = [("method", f"{cfg.method} {cfg.bits}-bit, group {cfg.group_size}, "
                       f"{'sym' if cfg.sym else 'asym'}"),
            ("layers quantized", summary["layers"]),
            ("weights quantized", f"{summary['quantized_params']:,}"),
            ("bits per weight", f"{summary['bits_per_weight']:.3f} "
                                f"({summary['bits_per_weight'] / 16:.1%} of fp16)"),
            *([("embeddings", summary["embeddings"])] if "embeddings" in summary else []),
            ("size on disk", f"{human_bytes(summary['size_on_disk'])} (input "
                             f"{human_bytes(src)})"),
            ("written to", summary["out"])]
    print_table("slm quantize", rows)


# --------------------------------------------------------------------------- prune / factorize

@app.command()
def prune(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    method: str = typer.Option("wanda", "--method", "-m",
                               help="magnitude, wanda or sparsegpt (unstructured / N:M)."),
    sparsity: float = typer.Option(0.5, help="Fraction of weights to remove, in [0, 1)."),
    pattern: Optional[str] = typer.Option(None, help="N:M semi-structured pattern, e.g. 2:4."),
    compact: bool = typer.Option(False, "--compact", help="With --pattern: store N:M layers "
                                 "as kept values + a bit mask (2:4 fp32: 53% of the dense "
                                 "bytes); loads with slmkit only."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole heads, MLP "
                                    "channels, hidden channels and layers (smaller dense model)."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Structured: "
                                                  "keep this fraction of parameters, e.g. 0.75."),
    heads: Optional[int] = typer.Option(None, help="Structured: attention heads to remove per "
                                        "layer."),
    mlp_channels: Optional[int] = typer.Option(None, "--mlp-channels", help="Structured: MLP "
                                               "channels to remove per layer."),
    hidden: Optional[int] = typer.Option(None, help="Structured: hidden (embedding) channels to "
                                         "remove."),
    drop_layers: Optional[int] = typer.Option(None, "--drop-layers", help="Structured: whole "
                                              "layers to remove."),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help="Regex of linears to "
                                                "prune (repeatable; default all but lm_head)."),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help="Regex of linears to "
                                               "skip (repeatable; default lm_head)."),
    data: str = typer.Option("stdlib", help="Calibration corpus (stdlib, file, dir, glob)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration "
                                                "windows (default 32 structured, 64 "
                                                "otherwise)."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per window."),
    damp: float = typer.Option(0.01, help="SparseGPT relative Hessian dampening."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Prune weights (magnitude, Wanda, SparseGPT, N:M) or structure (--structured)."""
    from slmkit.compress.prune.api import PruneConfig, run_prune

    cfg = PruneConfig(model=model, out=str(out), method=method, sparsity=sparsity,
                      pattern=pattern, compact=compact, structured=structured,
                      target_params=target_params,
                      heads=heads, mlp_channels=mlp_channels, hidden=hidden,
                      drop_layers=drop_layers, targets=targets, ignore=ignore, data=data,
                      calib_samples=calib_samples, calib_seq_len=calib_seq_len, damp=damp,
                      overwrite=overwrite)
    res = run_prune(cfg)
    if structured:
        print_table("removed", res["removed_rows"], header=("part", "before", "after",
                                                            "removed"))
        rows = [("parameters", f"{res['params_before']:,} -> {res['params_after']:,} "
                               f"({res['params_after'] / res['params_before']:.1%})"),
                ("calibration loss", f"{res['loss_before']:.3f} -> {res['loss_after']:.3f} "
                                     "(before any retraining)")]
        if res["candidates"] > 1:
            rows.append(("split", f"best of {res['candidates']} by calibration loss"))
        if "decode_tok_s" in res:
            rows.append(("decode tok/s", f"{res['decode_tok_s_before']:.1f} -> "
                                         f"{res['decode_tok_s']:.1f} "
                                         f"(x{res['decode_speedup']:.2f})"))
        rows += [("size on disk", human_bytes(res["size_on_disk"])), ("written to", res["out"])]
        print_table("slm prune --structured", rows)
        return
    print_table("achieved sparsity per layer",
                [(name, f"{v:.1%}") for name, v in res["layer_sparsity"].items()],
                header=("layer", "sparsity"))
    print_table("slm prune", [
        ("method", res["method"]), ("layers pruned", res["layers_pruned"]),
        ("sparsity (pruned layers)", f"{res['sparsity']:.1%}"),
        ("zeros", f"{res['zeros']:,} of {res['total']:,}"),
        *([("compact storage", f"{res['compact_layers']} layers (values + bit mask)")]
          if res["compact_layers"] else []),
        ("size on disk", human_bytes(res["size_on_disk"])), ("written to", res["out"])])


@app.command()
def factorize(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    method: str = typer.Option("svd", "--method", "-m", help="svd or asvd (activation-aware)."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of each layer's parameters to "
                                          "keep, in (0, 1) (default 0.8)."),
    energy: Optional[float] = typer.Option(None, help="Fraction of spectral energy to keep "
                                           "(instead of --ratio)."),
    merge: bool = typer.Option(False, "--merge", help="Write a dense model (B @ A merged "
                               "back); on a low-rank input, only merge."),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help="Regex of linears to "
                                                "factorize (repeatable; default all but lm_head)."),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help="Regex of linears to "
                                               "skip (repeatable; default lm_head)."),
    data: str = typer.Option("stdlib", help="Calibration corpus for asvd."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration windows."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per window."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Replace linears by low-rank factors B @ A (SVD or activation-aware SVD)."""
    from slmkit.compress.factorize.api import FactorizeConfig, run_factorize

    res = run_factorize(FactorizeConfig(
        model=model, out=str(out), method=method, ratio=ratio, energy=energy, merge=merge,
        targets=targets, ignore=ignore, data=data, calib_samples=calib_samples,
        calib_seq_len=calib_seq_len, overwrite=overwrite))
    if res["merged_only"]:
        print_table("slm factorize --merge", [("layers merged", res["layers_merged"]),
                                              ("size on disk", human_bytes(res["size_on_disk"])),
                                              ("written to", res["out"])])
        return
    print_table("ranks per layer", [(n, r) for n, r in res["ranks"].items()] +
                [(n, "dense (no saving)") for n in res["skipped"]], header=("layer", "rank"))
    print_table("slm factorize", [
        ("method", res["method"]), ("target", f"ratio {res['ratio']}" if res["ratio"]
                                    else f"energy {res['energy']}"),
        ("layers factorized", f"{res['layers_factorized']} (kept dense: {len(res['skipped'])})"),
        ("targeted parameters", f"{res['dense_params']:,} -> {res['factored_params']:,} "
                                f"({res['factored_params'] / max(1, res['dense_params']):.1%})"),
        ("format", "dense (merged)" if merge else "lowrank"),
        ("size on disk", human_bytes(res["size_on_disk"])), ("written to", res["out"])])


# --------------------------------------------------------------------------- generate / chat

def _sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                     stop=None, ignore_eos=False):
    from slmkit.engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                          seed=seed, stop=list(stop or []), ignore_eos=ignore_eos)


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    prompt: str = typer.Argument(..., help="The text to continue."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="New tokens at most."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p * p_max."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at end-of-text."),
    chat_template: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat "
                                       "template as one user message."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: "
                                          "physical cores)."),
) -> None:
    """Generate text from a prompt, streaming it to the terminal, then report tokens/s."""
    from slmkit.engine import Engine
    from slmkit.engine.generate import chat_stop_ids, encode_prompt
    from slmkit.models import load_model

    params = _sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                              seed, stop, ignore_eos)
    lm, tok = load_model(model, dtype=dtype)
    ids = encode_prompt(tok, prompt, chat=chat_template)
    if chat_template:
        params.stop_token_ids = chat_stop_ids(tok)
    context = getattr(lm.config, "max_position_embeddings", None) or len(ids) + max_tokens + 1
    engine = Engine(lm, tok, max_batch=1, background=False, threads=threads,
                    max_seq_len=max(2, min(len(ids) + max_tokens + 1, context)))
    handle = engine.submit(ids, params)
    if not chat_template:
        sys.stdout.write(prompt)
    for delta in handle.text_deltas():
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = handle.result()
    rate = c.decode_tokens_per_s
    print_table("slm generate", [
        ("path", engine.path),
        ("prompt tokens", c.prompt_tokens), ("generated tokens", c.completion_tokens),
        ("finish reason", c.finish_reason),
        ("time to first token", f"{c.ttft_s * 1000:.0f} ms"),
        ("decode speed", f"{rate:.1f} tok/s" if rate else "n/a"),
        ("threads", _torch_threads())])


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@app.command()
def chat(
    model: str = typer.Argument(..., help="Model directory or hub id (with a chat template)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Reply tokens at most."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p * p_max."),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="1 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
) -> None:
    """Chat with a model in the terminal (streaming, history; /reset, /exit)."""
    import time

    from slmkit.engine.chat import ChatSession
    from slmkit.models import load_model

    params = _sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                              seed)
    lm, tok = load_model(model, dtype=dtype)
    if threads:
        import torch

        torch.set_num_threads(threads)
    session = ChatSession(lm, tok, params, system=system)
    console.print(f"[bold]slm chat[/bold] {model}  ·  /reset clears the history, /exit or "
                  "Ctrl-D quits", highlight=False)
    turns = tokens = 0
    seconds = 0.0
    while True:
        try:
            message = console.input("[bold green]you>[/bold green] ")
        except EOFError:
            console.print()
            break
        text = message.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            console.print("[dim](history cleared)[/dim]")
            continue
        console.print("[bold blue]model>[/bold blue] ", end="")
        start = time.perf_counter()
        try:
            for delta in session.send(text):
                console.out(delta, end="", highlight=False)
        except KeyboardInterrupt:
            console.print("[dim] (stopped)[/dim]", end="")
        console.print()
        c = session.last
        if c is not None:
            turns += 1
            tokens += c.completion_tokens
            seconds += time.perf_counter() - start
            rate = c.decode_tokens_per_s
            note = f"{c.completion_tokens} tokens" + (f", {rate:.1f} tok/s" if rate else "")
            if session.dropped_turns:
                note += f", {session.dropped_turns} oldest turn(s) dropped to fit the context"
            console.print(f"[dim]({note})[/dim]")
    session.close()
    print_table("slm chat", [("turns", turns), ("generated tokens", tokens),
                             ("average tok/s", f"{tokens / seconds:.1f}" if seconds else "n/a")])


# --------------------------------------------------------------------------- serve

@app.command()
def serve(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback "
                             "by default; 0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port (0 = any free port)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model id clients use (default: "
                                       "the model directory's name)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: "
                                          "Bearer KEY' (also $SLM_API_KEY)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API "
                                                "key from this file."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT LoRA adapter dir to "
                                           "merge into the model."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", help="Requests decoded at "
                                        "once (engine batch slots)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a "
                                  "slot; more get 429."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", help="Longest "
                                                    "prompt accepted (default: context - 1)."),
    max_tokens_cap: Optional[int] = typer.Option(None, "--max-tokens-cap", help="Largest "
                                                 "max_tokens accepted (default: context)."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="Seconds per "
                                          "request before 504."),
    shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout", help="Seconds streams "
                                           "get to finish on SIGTERM."),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="Allow this "
                                                    "browser origin (repeatable; off by "
                                                    "default)."),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Include prompt text in "
                                     "the request log (off for privacy)."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Prompt + reply "
                                              "tokens per request (KV cache per slot; "
                                              "default: the model's context, at most 2048)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of the engine "
                                          "(default: physical cores)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
    kv_cache: str = typer.Option("auto", "--kv-cache", help="KV cache dtype: auto (fp16 for "
                                 "quantized fp32 models, else the model's), fp32, fp16, "
                                 "bf16 or int8 (half of fp16's bytes; long contexts)."),
) -> None:
    """Serve a model with an OpenAI-compatible API and a web chat page at /."""
    from pydantic import ValidationError

    from slmkit.errors import ConfigError
    from slmkit.serve import ServeConfig, load_for_serving, resolve_api_key, run_server

    key = resolve_api_key(api_key, api_key_file)
    try:
        config = ServeConfig(
            name=name or Path(model.rstrip("/")).name or "slm", host=host, port=port,
            api_key=key, cors_origins=list(cors_origin or []), max_concurrency=max_concurrency,
            max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
            max_tokens_cap=max_tokens_cap, request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout, log_prompts=log_prompts, max_seq_len=max_seq_len,
            threads=threads, kv_cache=kv_cache)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}.") from None
    lm, tok = load_for_serving(model, adapter=adapter, dtype=dtype)
    started = {}

    def ready(bound_host: str, bound_port: int) -> None:
        started["url"] = f"http://{bound_host}:{bound_port}"
        print_table("slm serve", [
            ("model", f"{config.name} ({model})" + (f" + adapter {adapter}" if adapter else "")),
            ("chat page", started["url"] + "/"),
            ("OpenAI base URL", started["url"] + "/v1"),
            ("auth", "Bearer API key" if key else "none (loopback only is safest)"),
            ("slots / queue", f"{max_concurrency} / {max_queue}"),
            ("CORS", ", ".join(config.cors_origins) or "off")])
        console.print("[dim]Ctrl-C or SIGTERM stops gracefully; one JSON log line per request "
                      "follows on stderr.[/dim]", highlight=False)

    run_server(lm, tok, config, on_ready=ready)
    print_table("slm serve", [("stopped", "cleanly"), ("served at", started.get("url", "-"))])


# --------------------------------------------------------------------------- export

@app.command()
def export(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    format_: str = typer.Option(..., "--format", "-f", help="gguf (llama.cpp, Ollama) or onnx "
                                "(ONNX Runtime)."),
    out: Path = typer.Option(..., "--out", "-o", help="GGUF: the .gguf file; ONNX: a "
                             "directory."),
    quant: Optional[str] = typer.Option(None, "--quant", help="GGUF tensor type: f32, f16, "
                                        "bf16, q8_0, q4_0 or q4_1 (default f16). Models "
                                        "from `slm quantize` keep their calibrated g32 "
                                        "blocks; --quant sets their other matrices."),
    ollama: bool = typer.Option(False, "--ollama", help="GGUF: also write a Modelfile for "
                                "`ollama create`."),
    int8: bool = typer.Option(False, "--int8", help="ONNX: ONNX Runtime dynamic int8 "
                              "quantization of the matrices."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Export to GGUF (llama.cpp / Ollama) or ONNX (ONNX Runtime)."""
    fmt = format_.lower()
    if fmt == "gguf":
        if int8:
            raise SlmError("--int8 is an ONNX option; for GGUF use --quant q8_0.")
        from slmkit.export.gguf_export import export_gguf

        res = export_gguf(model, out, quant=quant, ollama=ollama, overwrite=overwrite)
        print_table("slm export --format gguf", res.rows())
    elif fmt == "onnx":
        if quant or ollama:
            raise SlmError("--quant and --ollama are GGUF options; for ONNX use --int8.")
        from slmkit.export.onnx_export import export_onnx

        res = export_onnx(model, out, int8=int8, overwrite=overwrite)
        print_table("slm export --format onnx", res.rows())
    else:
        raise SlmError(f"--format '{format_}' is not supported; use gguf or onnx.")


# --------------------------------------------------------------------------- eval / compare

def _eval_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _split_tasks(tasks: Optional[list[str]]) -> list[str]:
    return [t for item in tasks or [] for t in item.split(",") if t.strip()]


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help="Model directory or hub id (omit with "
                                          "--write-tasks to only write the task files)."),
    data: str = typer.Option("stdlib", "--data", "-d", help="Text for perplexity and where "
                             "built-in tasks are mined: stdlib, a file, dir, glob or .jsonl."),
    split: str = typer.Option("val", help="Corpus split: val, train or all."),
    val_fraction: float = typer.Option(0.05, help="Validation share of the corpus split."),
    tasks: Optional[list[str]] = typer.Option(
        None, "--tasks", "-t", help="Comma-separated: stdlib (all built-ins), stdlib-funcname, "
        "stdlib-docstring-mc, stdlib-nextline, stdlib-docstring, or .jsonl task files. "
        'JSONL lines: {"type":"multiple_choice","context":..,"choices":[..],"answer":i} or '
        '{"type":"generation","prompt":..,"answer":..,"stop":["\\n"]}.'),
    task_limit: int = typer.Option(100, help="Items per task (0: all)."),
    write_tasks: Optional[Path] = typer.Option(None, help="Write the task sets as JSONL "
                                               "into this new directory."),
    seq_len: Optional[int] = typer.Option(None, help="Perplexity window (default "
                                          "min(context, 512))."),
    stride: Optional[int] = typer.Option(None, help="New tokens per window (default half)."),
    max_bytes: int = typer.Option(200_000, help="Text budget in bytes, the same for every "
                                  "tokenizer (0: the whole split)."),
    max_tokens: Optional[int] = typer.Option(None, help="Score at most this many tokens."),
    ppl: bool = typer.Option(True, "--ppl/--no-ppl", help="Measure perplexity."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure speed and TTFT."),
    decode_tokens: int = typer.Option(32, help="Tokens generated for the decode speed."),
    dtype: Optional[str] = typer.Option(None, help="fp32 (default), bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads (default: torch's)."),
    record: bool = typer.Option(True, "--record/--no-record", help="Append the results to "
                                "the model's slmkit.json metrics."),
    overwrite: bool = typer.Option(False, help="Replace --write-tasks if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Measure a model: perplexity and bits/byte, task accuracy, speed, memory and size."""
    from slmkit.errors import ConfigError
    from slmkit.eval.evaluate import EvalConfig, evaluate_with

    cfg = EvalConfig.from_cli(  # the same config as the `eval` recipe step
        data=data, split=split, val_fraction=val_fraction, tasks=tasks, task_limit=task_limit,
        seq_len=seq_len, stride=stride, max_bytes=max_bytes, max_tokens=max_tokens, ppl=ppl,
        speed=speed, decode_tokens=decode_tokens, dtype=dtype, device=device, threads=threads,
        record=record)
    task_sets = cfg.task_sets()
    if write_tasks is not None:
        from slmkit.eval.tasks import write_task_file
        from slmkit.models import atomic_dir

        if not task_sets:
            raise ConfigError("--write-tasks needs --tasks, e.g. --tasks stdlib.")
        with atomic_dir(write_tasks, overwrite=overwrite) as tmp:
            for name, items in task_sets.items():
                write_task_file(tmp / f"{name}.jsonl", items)
        if model is None:
            print_table("slm eval --write-tasks", [
                (f"{write_tasks}/{n}.jsonl", f"{len(i)} {i[0]['type']} items")
                for n, i in task_sets.items()], header=("file", "items"))
            return
    if model is None:
        raise ConfigError("slm eval needs a MODEL directory (or --write-tasks DIR to only "
                          "write the task sets).")
    res = evaluate_with(model, cfg, task_sets)
    if as_json:
        res.pop("lineage", None)
        sys.stdout.write(json.dumps(res, indent=2, default=str) + "\n")
        return
    from slmkit.eval.evaluate import result_rows

    print_table(f"slm eval {model}", result_rows(res))
    if record and res.get("recorded"):
        console.print(f"[dim]metrics appended to {res['path']}/slmkit.json[/dim]")


@app.command()
def compare(
    models: list[str] = typer.Argument(..., help="Model directories or hub ids."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory to create."),
    data: str = typer.Option("stdlib", "--data", "-d", help="Text for bits per byte (the "
                             "same bytes for every model) and for built-in tasks."),
    split: str = typer.Option("val", help="Corpus split: val, train or all."),
    val_fraction: float = typer.Option(0.05, help="Validation share of the corpus split."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", "-t", help="As for slm eval."),
    task_limit: int = typer.Option(100, help="Items per task (0: all)."),
    seq_len: Optional[int] = typer.Option(None, help="Perplexity window."),
    stride: Optional[int] = typer.Option(None, help="New tokens per window."),
    max_bytes: int = typer.Option(200_000, help="Text budget in bytes (0: the whole split)."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure speed and TTFT."),
    decode_tokens: int = typer.Option(32, help="Tokens generated for the decode speed."),
    dtype: Optional[str] = typer.Option(None, help="fp32 (default), bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads (default: torch's)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json to stdout too."),
) -> None:
    """Compare models side by side: table, plots and an HTML/Markdown report."""
    from slmkit.eval.compare import compare as run_compare
    from slmkit.eval.report import cell_value, columns, format_cell, pareto_labels

    _eval_threads(threads)
    res = run_compare(models, out, data=data, split=split, val_fraction=val_fraction,
                      task_specs=_split_tasks(tasks), task_limit=task_limit or None,
                      overwrite=overwrite, seq_len=seq_len, stride=stride,
                      max_bytes=max_bytes or None, speed=speed, decode_tokens=decode_tokens,
                      dtype=dtype, device=device)
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, default=str) + "\n")
        return
    cols = [c for c in columns(res) if c[1] in ("size_on_disk", "bits_per_byte",
                                                  "decode_tok_s", "peak_rss_bytes")
            or ":" in c[1]]
    fronts = pareto_labels(res)
    rows, failed = [], []
    for m in res["models"]:
        if m.get("error"):
            failed.append((m["label"], m["error"]))
            rows.append([m["label"], "failed"] + ["–"] * len(cols))
            continue
        rows.append([m["label"], ",".join(fronts[m["label"]])]
                    + [format_cell(cell_value(m, key), spec, m, key)
                       for _, key, spec, _ in cols])
    heads = [c[0].replace("stdlib-", "").replace("exact_match", "EM") for c in cols]
    print_table("slm compare", rows, header=["model", "Pareto"] + heads)
    for label, error in failed:
        console.print(f"[red]{label} failed:[/red] {error}")
    console.print(f"report: {res['out']}/report.html  (results.json, report.md, "
                  "quality_vs_size.png, quality_vs_speed.png)")


# --------------------------------------------------------------------------- entry point

def _click_classes(name: str) -> tuple[type, ...]:
    """``click``'s exception class, plus typer's vendored copy (typer >= 0.20 parses the
    command line with its own ``typer._click``, whose errors are not click's)."""
    classes = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        classes.append(getattr(vendored, name))
    return tuple(classes)


_CLICK_ERRORS = _click_classes("ClickException")
_CLICK_ABORTS = _click_classes("Abort")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, map user errors to one line and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rv = app(args=args, prog_name="slm", standalone_mode=False)
    except SlmError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except _CLICK_ERRORS as e:  # usage errors: missing/extra arguments, bad values
        e.show()
        sys.exit(e.exit_code)
    except (*_CLICK_ABORTS, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
