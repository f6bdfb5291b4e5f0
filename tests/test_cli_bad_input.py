"""Every step verb, every option, one invalid value at a time: exit 2, one sentence naming
the option, no traceback, no output left behind.

The cases are derived from the step configs themselves (the same fields the CLI flags are
generated from), so a new option is covered the day it is added: an unknown choice for a
``Literal``, a non-number and an out-of-range number for numeric fields with bounds, and a
missing path for the fields that name a model or tokenizer.
"""

from __future__ import annotations

import typing

import pytest

from slmkit.cli import STEP_VERBS, main
from slmkit.cli_options import _cli_type, _meta, cli_fields, flag_name
from slmkit.pipeline.steps import STEP_KINDS

PATH_FIELDS = {"model", "tokenizer", "teacher", "student", "models", "from_report", "gguf"}


def base_args(verb: str, model: str, tok: str, out: str) -> list[str]:
    """A valid command line of ``verb`` that one bad value is added to."""
    train = ["--tokenizer", tok, "--max-steps", "1", "--data", tok, "--out", out]
    return {
        "init": ["init", "--preset", "nano", "--tokenizer", tok, "--out", out],
        "train": ["train", "--model", "nano", *train],
        "distill": ["distill", "--teacher", model, "--student", "nano", *train],
        "finetune": ["finetune", model, "--data", "stdlib-docstring", "--max-steps", "1",
                     "--out", out],
        "augment": ["augment", model, "--data", "stdlib-docstring", "--out", out],
        "federate": ["federate", model, "--clients", "stdlib-docstring", "--out", out],
        "quantize": ["quantize", model, "--out", out],
        "prune": ["prune", model, "--out", out],
        "factorize": ["factorize", model, "--out", out],
        "search": ["search", model, "--max-size-mb", "1", "--out", out],
        "export": ["export", model, "--format", "gguf", "--out", out],
        "import": ["import", model, "--out", out],
        "eval": ["eval", model, "--out", out],
        "compare": ["compare", model, "--out", out],
        "tokenizer": ["tokenizer", "train", "--data", tok, "--out", out],
        "generate": ["generate", model, "def f(", "-n", "2"],
        "chat": ["chat", model, "-n", "2"],
        "serve": ["serve", model, "--port", "0"],
    }[verb]


def config_of(verb: str):
    """The config a verb's flags come from: a step's, or serve/generate/chat's own."""
    from slmkit.engine.options import ChatConfig, GenerateConfig
    from slmkit.serve.config import ServeCommand

    own = {"generate": GenerateConfig, "chat": ChatConfig, "serve": ServeCommand}
    return own[verb] if verb in own else STEP_KINDS[verb].config_class()


def _bounds(info) -> dict[str, float]:
    out = {}
    for m in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                out[key] = getattr(m, key)
    return out


def bad_values(name: str, info) -> list[tuple[str, str]]:
    """(value, why) pairs that the option must refuse."""
    tp = _cli_type(info.annotation)
    if typing.get_origin(tp) is typing.Literal:
        return [("bogus", "unknown choice")]
    if tp in (int, float):
        cases = [("abc", "not a number")]
        b = _bounds(info)
        if "ge" in b:
            cases.append((str(type(b["ge"])(b["ge"]) - 1), "below the minimum"))
        if "gt" in b:
            cases.append((str(b["gt"]), "at the exclusive minimum"))
        if "le" in b:
            cases.append((str(b["le"] + 1), "above the maximum"))
        if "lt" in b:
            cases.append((str(b["lt"]), "at the exclusive maximum"))
        return cases
    if name in PATH_FIELDS:
        return [("/nonexistent/slmkit-missing", "missing path")]
    return []


def cases():
    for verb in [*STEP_VERBS, "tokenizer", "generate", "chat", "serve"]:
        config = config_of(verb)
        for name, info in cli_fields(config).items():
            for value, why in bad_values(name, info):
                yield pytest.param(verb, name, value, id=f"{verb}-{name}-{why}")


@pytest.mark.parametrize("verb,field,value", list(cases()))
def test_bad_value_is_refused_cleanly(verb, field, value, llama_dir, tokenizer_dir, tmp_path,
                                      capsys):
    out = tmp_path / "out"
    args = base_args(verb, str(llama_dir), str(tokenizer_dir), str(out))
    info = config_of(verb).model_fields[field]
    meta = _meta(info)
    if meta.get("argument"):                       # the positional: replace it
        pos = 2 if verb == "tokenizer" else 1
        args[pos] = value
        named = value
    else:
        flag = (meta.get("flag") or flag_name(field)).split("/")[0]
        if flag in args:                           # replace the base value
            i = args.index(flag)
            args[i + 1] = value
        else:
            args += [flag, value]
        named = flag
    with pytest.raises(SystemExit) as exit_:
        main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert exit_.value.code == 2, f"{args}: exit {exit_.value.code}\n{text}"
    assert "Traceback" not in text, text
    assert named in captured.err or value in captured.err, \
        f"{args}: the message names neither {named} nor {value}:\n{captured.err}"
    assert not out.exists(), f"{args} left {out} behind"
    assert not list(tmp_path.glob(".out*")), f"{args} left a temp dir behind"


def test_every_step_verb_is_covered():
    """Each step verb has options with checked values, and the table names every step."""
    assert set(STEP_VERBS) | {"tokenizer"} == set(STEP_KINDS)
    per_verb = {}
    for c in cases():
        per_verb[c.values[0]] = per_verb.get(c.values[0], 0) + 1
    assert all(per_verb.get(v, 0) >= 2 for v in [*STEP_KINDS, "generate", "chat", "serve"]), \
        per_verb


@pytest.mark.parametrize("extra,says", [
    (["--threads", "0"], "--threads"),
    (["-n", "100000000"], "exceeds the model's context"),
    (["--stop", ""], "Invalid --stop"),
])
def test_generate_refuses_what_it_cannot_honour(extra, says, llama_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(llama_dir), "def f(", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err


@pytest.mark.parametrize("args,says", [
    (["init", "--preset", "nano", "--set", "hidden_size=abc"], "--set hidden_size=abc"),
    (["train", "--model", "bogus_preset", "--max-steps", "1"], "nano, micro"),
])
def test_messages_name_the_input(args, says, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_recipe_value_error_names_file_line_and_step(llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - name: q4\n    step: quantize\n    model: {llama_dir}\n"
                      "    bits: 5\n")
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(recipe), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{recipe}:2: step 'q4'" in err and "--bits 5" in err
    assert not (tmp_path / "w").exists()


def test_the_cli_starts_without_importing_torch():
    """Building every verb's flags reads only the pydantic configs: `slm --help` must not
    pay torch's import (seconds on a busy machine)."""
    import subprocess
    import sys

    code = ("import sys, slmkit.cli; mods = {m.split('.')[0] for m in sys.modules}; "
            "print(sorted(mods & {'torch', 'transformers', 'flwr', 'llguidance'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
