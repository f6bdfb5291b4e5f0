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
        if key != "format":
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


# --------------------------------------------------------------------------- quickstart

@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Working directory."),
) -> None:
    """Run the built-in end-to-end job on the stdlib corpus (what `make demo` runs)."""
    from slmkit.pipeline.quickstart import run_quickstart

    run_quickstart(out)


# --------------------------------------------------------------------------- entry point

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
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
