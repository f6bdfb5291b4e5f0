"""From-scratch presets, `slm init`, `slm info`, and help for every verb."""

from __future__ import annotations

import json

import pytest

from slmkit.errors import ConfigError
from slmkit.models.presets import PRESETS, build_config, count_params, init_model

EXPECTED = {"nano": (0.7e6, 2e6), "micro": (3e6, 7e6), "small": (15e6, 35e6),
            "base": (70e6, 130e6), "micro-swa": (3e6, 7e6), "micro-moe": (5e6, 15e6)}


class _Vocab8k:
    """Stands in for a tokenizer's size so counts match the documented 8k-vocab figures."""

    bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

    def __len__(self):
        return 8192


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "base"])
def test_preset_sizes(preset):
    model = init_model(preset, _Vocab8k())
    counts = count_params(model)
    lo, hi = EXPECTED[preset]
    assert lo <= counts["total"] <= hi
    if preset == "micro-moe":
        assert counts["active"] < counts["total"]
    else:
        assert counts["active"] == counts["total"]


def test_base_preset_config_size():
    from transformers import AutoModelForCausalLM

    import torch

    config = build_config("base", _Vocab8k())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lo, hi = EXPECTED["base"]
    assert lo <= count_params(model)["total"] <= hi


def test_preset_techniques():
    assert build_config("micro-swa").sliding_window == 256
    moe = build_config("micro-moe")
    assert moe.num_local_experts == 4 and moe.num_experts_per_tok == 2
    micro = build_config("micro")
    assert micro.num_key_value_heads < micro.num_attention_heads  # GQA
    assert micro.hidden_act == "silu"  # SwiGLU


def test_overrides_and_errors():
    assert build_config("nano", overrides={"num_hidden_layers": 3}).num_hidden_layers == 3
    with pytest.raises(ConfigError, match="no field"):
        build_config("nano", overrides={"not_a_field": 1})
    with pytest.raises(ConfigError, match="Unknown preset"):
        build_config("gigantic")
    with pytest.raises(ConfigError, match="divisible"):
        build_config("nano", overrides={"num_attention_heads": 5})


def test_init_and_info_cli(cli, tokenizer_dir, tmp_path):
    out = tmp_path / "moe"
    r = cli("init", "--preset", "micro-moe", "--tokenizer", tokenizer_dir, "--out", out,
            "--set", "num_hidden_layers=2")
    assert r.returncode == 0, r.stderr
    assert "active per token" in r.stdout and str(out) in r.stdout
    r = cli("info", out, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model_type"] == "mixtral" and data["active_params"] < data["params"]
    assert [e["step"] for e in data["lineage"]] == ["init"]
    assert data["lineage"][0]["params"]["set"] == {"num_hidden_layers": 2}
    r = cli("info", out)
    assert r.returncode == 0 and "lineage" in r.stdout and "MixtralForCausalLM" in r.stdout
    # same output dir again: refused, nothing changed
    r = cli("init", "--preset", "nano", "--tokenizer", tokenizer_dir, "--out", out)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_bad_set_syntax(cli, tokenizer_dir, tmp_path):
    r = cli("init", "--preset", "nano", "--tokenizer", tokenizer_dir, "--out", tmp_path / "x",
            "--set", "novalue")
    assert r.returncode == 2 and "key=value" in r.stderr
    assert not (tmp_path / "x").exists()


def _all_verbs():
    """Every command path of the CLI, nested groups included."""
    import typer.main

    from slmkit.cli import app

    group = typer.main.get_command(app)
    paths = []

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.append(prefix + [name])
            walk(sub, prefix + [name])

    walk(group, [])
    return paths


def test_help_for_every_verb(cli):
    r = cli("--help")
    assert r.returncode == 0 and "Usage" in r.stdout
    verbs = _all_verbs()
    assert ["init"] in verbs and ["info"] in verbs
    from slmkit.cli import main

    for path in verbs:
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0, path


@pytest.mark.parametrize("args,says", [
    (("init", "micro"), "Missing option '--preset'"),
    (("train", "--bogus", "1"), "No such option: --bogus"),
    (("quantize",), "Missing argument 'model'"),
])
def test_usage_errors_are_one_message_and_exit_2(cli, args, says):
    r = cli(*args)
    assert r.returncode == 2
    assert says in r.stderr and "Traceback" not in r.stderr + r.stdout
