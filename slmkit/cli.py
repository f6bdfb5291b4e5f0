"""The ``slm`` command line: verbs -> library functions.

Thin by design. Every step verb (quantize, prune, train, ...) is generated from its step's
pydantic config and calls its ``run(cfg) -> StepResult`` (:mod:`slmkit.pipeline.steps`,
:mod:`slmkit.cli_options`); the hand-written verbs here are the ones that are not steps
(info, generate, chat, serve, run, quickstart). Every user error is an ``SlmError``,
printed as one line on stderr with exit code 2 (``--debug`` shows the traceback). Heavy
imports (torch, transformers) happen inside the verbs so that ``slm --help`` stays instant.
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


# --------------------------------------------------------------------------- info

@app.command()
def info(
    model: Optional[str] = typer.Argument(None, help="Model directory, hub id, .gguf file or "
                                          "builtin name (omit with --builtins)."),
    builtins: bool = typer.Option(False, "--builtins", help="List the built-in models."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Show a model's architecture, size, compression state and lineage."""
    from slmkit.models.info import model_info

    if builtins or model is None:
        from slmkit.models.gguf_file import BUILTIN_PREFIX, BUILTINS

        if not builtins:
            raise SlmError("slm info needs a MODEL (or --builtins to list the built-in "
                           "models).")
        print_table("built-in models (slm info NAME, or any verb's MODEL)", [
            (BUILTIN_PREFIX + n, b.title, b.dist) for n, b in BUILTINS.items()],
            header=("name", "model", "package"))
        return
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


# --------------------------------------------------------------------------- the steps

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
rag_app = typer.Typer(no_args_is_help=True, help="Retrieval-augmented generation over local "
                      "documents, offline: index, query, ask (with citations), eval.")
app.add_typer(rag_app, name="rag")
route_app = typer.Typer(no_args_is_help=True, help="SLM <-> LLM routing for `slm serve "
                        "--fallback`: train a router, calibrate thresholds, measure.")
app.add_typer(route_app, name="route")

#: verb -> (step kind, help). Flags come from each step's config (slmkit.pipeline.steps).
STEP_VERBS = {
    "init": ("init", "Create a randomly initialised model from a preset."),
    "train": ("train", "Pretrain (or continue pretraining) a causal LM with the LM objective."),
    "distill": ("distill", "Distill a teacher into a student (KD objective in the training "
                "loop)."),
    "finetune": ("finetune", "Fine-tune on a task JSONL: LoRA adapters (peft), QLoRA or full, "
                 "loss on completions only."),
    "federate": ("federate", "Federated LoRA / QLoRA fine-tuning on Flower: each client "
                 "trains on its own data, only adapters travel."),
    "augment": ("augment", "Expand a task set with a teacher: sample, filter (dedup, length, "
                "log-prob), write JSONL."),
    "quantize": ("quantize", "Quantize linear weights to int8 / int4 (RTN, GPTQ or AWQ), or "
                 "--dequantize."),
    "prune": ("prune", "Prune weights (magnitude, Wanda, SparseGPT, N:M) or structure "
              "(--structured)."),
    "factorize": ("factorize", "Replace linears by low-rank factors B @ A (SVD or "
                  "activation-aware SVD)."),
    "search": ("search", "Search per-layer compression (bits, group size, dense) for the "
               "best model under a size / decode-speed budget."),
    "export": ("export", "Export to GGUF (llama.cpp / Ollama) or ONNX (ONNX Runtime)."),
    "import": ("import", "Import a GGUF file (llama.cpp / Ollama) or builtin:NAME as a Hugging "
               "Face model dir."),
    "eval": ("eval", "Measure a model: perplexity and bits/byte, task accuracy, speed, memory "
             "and size."),
    "compare": ("compare", "Compare models side by side: table, plots and an HTML/Markdown "
                "report."),
}


def _runner(step):
    """The step's run function, imported when the verb runs (not when the CLI starts)."""
    return lambda cfg: step.run_function()(cfg)


def _add_steps() -> None:
    from slmkit.cli_options import add_step_command
    from slmkit.pipeline.steps import STEP_KINDS
    from slmkit.engine.options import ChatConfig, GenerateConfig
    from slmkit.serve.config import ServeCommand

    def serve(cfg):
        from slmkit.serve.server import run_serve

        run_serve(cfg)

    add_step_command(app, "serve", ServeCommand, serve, "Serve a model with an "
                     "OpenAI-compatible API and a web chat page at /.", json=False)
    add_step_command(app, "generate", GenerateConfig, generate, "Generate text from a "
                     "prompt, streaming it to the terminal, then report tokens/s.", json=False)
    add_step_command(app, "chat", ChatConfig, chat, "Chat with a model in the terminal "
                     "(streaming, history; /reset, /exit).", json=False)
    from slmkit.monitor.config import MonitorConfig

    def monitor(cfg):
        from slmkit.monitor.report import run

        def embed(texts):  # the embedder `slm serve --request-log` logs prompts with
            from slmkit.rag.embed import Embedder

            return Embedder("minilm").encode(texts)
        return run(cfg, embed=embed)

    add_step_command(app, "monitor", MonitorConfig, monitor,
                     "Drift of a request log (prompt embeddings, length, language, "
                     "confidence, flags): table, Prometheus gauges, HTML report.")

    for verb, (kind, help_) in STEP_VERBS.items():
        step = STEP_KINDS[kind]
        add_step_command(app, verb, step.config_class(), _runner(step), help_)
    from slmkit.pipeline.steps import _resolve
    from slmkit.rag.config import RAG_VERBS

    for verb, (config, target, help_) in RAG_VERBS.items():
        add_step_command(rag_app, verb, config, lambda cfg, t=target: _resolve(t)(cfg), help_)
    from slmkit.route.config import ROUTE_VERBS

    for verb, (config, target, help_) in ROUTE_VERBS.items():
        add_step_command(route_app, verb, config, lambda cfg, t=target: _resolve(t)(cfg), help_)
    tok = STEP_KINDS["tokenizer"]
    add_step_command(tokenizer_app, "train", tok.config_class(), _runner(tok),
                     "Train a byte-level BPE tokenizer (GPT-2 regex, bos/eos/pad, ChatML "
                     "template).")


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
                                       "(default runs/quickstart, or runs/from-scratch)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Run the job on this "
                                        "model (dir, hub id, .gguf or builtin name) instead "
                                        "of builtin:smollm2-135m."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Run the from-scratch "
                                      "recipe instead: models trained, distilled, pruned, "
                                      "quantized and fine-tuned on the stdlib."),
    mini: bool = typer.Option(False, "--mini", help="The from-scratch recipe with tiny "
                              "budgets (checks an installation in about two minutes)."),
    force: bool = typer.Option(False, help="Rerun every step, ignoring the cache."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; run nothing."),
) -> None:
    """Compress, measure and export the built-in real model end to end (what `make demo`
    runs)."""
    from slmkit.pipeline.quickstart import run_quickstart

    run_quickstart(out, model=model, from_scratch=from_scratch, mini=mini, force=force,
                   dry_run=dry_run)


# --------------------------------------------------------------------------- generate / chat

def generate(cfg) -> None:
    """Generate text from a prompt, streaming it to the terminal, then report tokens/s."""
    from slmkit.engine import Engine
    from slmkit.engine.generate import chat_stop_ids, encode_prompt
    from slmkit.errors import ConfigError
    from slmkit.models import load_model
    from slmkit.models.arch import context_length

    params = cfg.params(stop=list(cfg.stop), ignore_eos=cfg.ignore_eos, grammar=cfg.grammar())
    lm, tok = load_model(cfg.model, dtype=cfg.dtype)
    ids = encode_prompt(tok, cfg.prompt, chat=cfg.chat)
    if cfg.chat:
        params.stop_token_ids = chat_stop_ids(tok)
    context = context_length(lm.config) or len(ids) + cfg.max_tokens + 1
    if len(ids) + cfg.max_tokens > context:
        raise ConfigError(f"--max-tokens {cfg.max_tokens} plus the {len(ids)}-token prompt "
                          f"exceeds the model's context of {context} tokens; lower "
                          "--max-tokens.")
    engine = Engine(lm, tok, max_batch=1, background=False, threads=cfg.threads,
                    max_seq_len=max(2, min(len(ids) + cfg.max_tokens + 1, context)),
                    draft=cfg.draft)
    handle = engine.submit(ids, params)
    if not cfg.chat:
        sys.stdout.write(cfg.prompt)
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
        *_draft_rows(c.speculative),
        ("threads", _torch_threads())])


def _draft_rows(spec: dict | None) -> list[tuple[str, str]]:
    """Result-table rows of speculative decoding (none without drafts)."""
    if spec is None:
        return []
    rate = "n/a" if spec["acceptance"] is None else f"{spec['acceptance']:.0%}"
    return [("draft", spec["draft"]),
            ("drafts accepted", f"{spec['accepted']}/{spec['drafted']} ({rate}), "
                                f"{spec['spec_steps']} drafted steps, k now {spec['k']}"),
            ("drafting", f"off: {spec['off']}" if spec["off"] else "on")]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def chat(cfg) -> None:
    """Chat with a model in the terminal (streaming, history; /reset, /exit)."""
    import time

    from slmkit.engine.chat import ChatSession
    from slmkit.models import load_model

    lm, tok = load_model(cfg.model, dtype=cfg.dtype)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    session = ChatSession(lm, tok, cfg.params(), system=cfg.system)
    console.print(f"[bold]slm chat[/bold] {cfg.model}  ·  /reset clears the history, /exit or "
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


_add_steps()


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
