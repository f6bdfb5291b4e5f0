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


# --------------------------------------------------------------------------- the steps

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

#: verb -> (step kind, help). Flags come from each step's config (slmkit.pipeline.steps).
STEP_VERBS = {
    "init": ("init", "Create a randomly initialised model from a preset."),
    "train": ("train", "Pretrain (or continue pretraining) a causal LM with the LM objective."),
    "distill": ("distill", "Distill a teacher into a student (KD objective in the training "
                "loop)."),
    "finetune": ("finetune", "Fine-tune on a task JSONL: LoRA adapters (peft), QLoRA or full, "
                 "loss on completions only."),
    "augment": ("augment", "Expand a task set with a teacher: sample, filter (dedup, length, "
                "log-prob), write JSONL."),
    "quantize": ("quantize", "Quantize linear weights to int8 / int4 (RTN, GPTQ or AWQ), or "
                 "--dequantize."),
    "prune": ("prune", "Prune weights (magnitude, Wanda, SparseGPT, N:M) or structure "
              "(--structured)."),
    "factorize": ("factorize", "Replace linears by low-rank factors B @ A (SVD or "
                  "activation-aware SVD)."),
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

    for verb, (kind, help_) in STEP_VERBS.items():
        step = STEP_KINDS[kind]
        add_step_command(app, verb, step.config_class(), _runner(step), help_)
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
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="New tokens at "
                                   "most (prompt + new tokens must fit the context)."),
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
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads "
                                          "(default: physical cores)."),
) -> None:
    """Generate text from a prompt, streaming it to the terminal, then report tokens/s."""
    from slmkit.engine import Engine
    from slmkit.engine.generate import chat_stop_ids, encode_prompt
    from slmkit.errors import ConfigError
    from slmkit.models import load_model
    from slmkit.models.arch import context_length

    if any(not s for s in stop or []):
        raise ConfigError("--stop '' would stop before the first token; pass a non-empty "
                          "stop string.")
    params = _sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                              seed, stop, ignore_eos)
    lm, tok = load_model(model, dtype=dtype)
    ids = encode_prompt(tok, prompt, chat=chat_template)
    if chat_template:
        params.stop_token_ids = chat_stop_ids(tok)
    context = context_length(lm.config) or len(ids) + max_tokens + 1
    if len(ids) + max_tokens > context:
        raise ConfigError(f"--max-tokens {max_tokens} plus the {len(ids)}-token prompt exceeds "
                          f"the model's context of {context} tokens; lower --max-tokens.")
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
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Reply tokens at "
                                   "most."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p * p_max."),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="1 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads."),
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
    max_request_bytes: int = typer.Option(4 << 20, "--max-request-bytes", help="Largest "
                                          "request body accepted (413 above it)."),
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
            threads=threads, kv_cache=kv_cache, max_request_bytes=max_request_bytes)
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
