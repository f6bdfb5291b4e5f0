"""Unstructured and N:M pruning of whole tiny models: sparsity, round trips, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.compress.match import match_linears, weight_matrix
from slmkit.compress.prune import ops
from slmkit.compress.prune.modifier import PruneOptions, prune_model
from slmkit.errors import ConfigError, validated
from tests.conftest import build_tiny_model, run_cli


@pytest.fixture(scope="session")
def calib_corpus(tmp_path_factory) -> str:
    """A small .jsonl corpus (fast to tokenize) for calibration in tests."""
    from slmkit.models.tokenizer import stdlib_sample

    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    texts = list(stdlib_sample(max_files=30, max_bytes=200_000))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _settings(calib_corpus, **kw) -> PruneOptions:
    return PruneOptions(calib_data=calib_corpus, calib_samples=8, calib_seq_len=32, **kw)


@pytest.mark.parametrize("arch,method", [("llama", "magnitude"), ("qwen2", "wanda"),
                                         ("mistral", "sparsegpt"), ("llama", "sparsegpt")])
def test_half_sparsity_is_reached_per_layer(arch, method, tokenizer, calib_corpus):
    model = build_tiny_model(arch, tokenizer)
    report = prune_model(model, tokenizer, _settings(calib_corpus, method=method, sparsity=0.5))
    linears = match_linears(model)
    assert set(report.layers) == set(linears) and len(linears) == 14
    for name, module in linears.items():
        assert ops.achieved_sparsity(weight_matrix(module)) >= 0.5
        assert report.layers[name] >= 0.5
    assert model.lm_head.weight.ne(0).all()  # ignored by default
    assert abs(report.overall - 0.5) < 0.01


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_four_pattern_holds_in_every_layer(method, tokenizer, calib_corpus):
    model = build_tiny_model("qwen2", tokenizer)
    prune_model(model, tokenizer, _settings(calib_corpus, method=method, pattern="2:4"))
    for module in match_linears(model).values():
        assert ops.holds_nm(weight_matrix(module), 2, 4)


def test_gpt2_conv1d_layers_are_pruned_in_their_own_layout(tokenizer, calib_corpus):
    model = build_tiny_model("gpt2", tokenizer)
    report = prune_model(model, tokenizer, _settings(calib_corpus, method="wanda",
                                                     pattern="2:4"))
    assert len(report.layers) == 8
    for module in match_linears(model).values():
        assert ops.holds_nm(weight_matrix(module), 2, 4)


def test_calibrated_pruning_keeps_the_model_closer_than_magnitude(tokenizer, calib_corpus):
    from slmkit.compress.calibrate import calibration_batches

    dense = build_tiny_model("llama", tokenizer)
    ids = calibration_batches(tokenizer, calib_corpus, n_samples=8, seq_len=32, seed=1)[0]
    with torch.no_grad():
        ref = dense(ids).logits
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        model = build_tiny_model("llama", tokenizer)
        prune_model(model, tokenizer, _settings(calib_corpus, method=method, sparsity=0.5))
        with torch.no_grad():
            errs[method] = float((model(ids).logits - ref).pow(2).mean())
    assert errs["sparsegpt"] < errs["magnitude"]


@pytest.mark.slow
def test_cli_prune_round_trip_keeps_zeros(llama_dir, tmp_path, calib_corpus):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    res = run_cli("prune", llama_dir, "--method", "sparsegpt", "--pattern", "2:4", "--out", out,
                  "--calib-data", calib_corpus, "--calib-samples", "8", "--calib-seq-len", "32")
    assert res.returncode == 0, res.stderr
    assert "achieved sparsity per layer" in res.stdout and "50.0%" in res.stdout
    plain = AutoModelForCausalLM.from_pretrained(out)  # no slmkit needed to load
    for module in match_linears(plain).values():
        assert ops.holds_nm(weight_matrix(module), 2, 4)
    record = json.loads((out / "slmkit.json").read_text())
    assert record["step"] == "prune" and abs(record["metrics"]["sparsity"] - 0.5) < 1e-6
    from slmkit.models.info import model_info

    assert model_info(out)["sparsity"] > 0.2  # embeddings count too


def test_cli_bad_input_is_one_sentence_and_no_output(llama_dir, tmp_path):
    out = tmp_path / "bad"
    res = run_cli("prune", llama_dir, "--method", "magnitude", "--sparsity", "1.0", "--out", out)
    assert res.returncode == 2, res.stderr
    assert "Invalid --sparsity" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_pattern_that_does_not_divide_a_layer_is_refused_before_pruning(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ConfigError, match="does not divide the input dimension 64"):
        prune_model(model, tokenizer, PruneOptions(method="magnitude", pattern="3:7"))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_settings_refuse_bad_values(tokenizer):
    for bad in (dict(sparsity=-0.2), dict(sparsity=1.5), dict(method="random"),
                dict(pattern="2/4")):
        with pytest.raises(ConfigError):
            validated(PruneOptions, **{"method": "wanda", **bad})
    model = build_tiny_model("llama", tokenizer)
    with pytest.raises(ConfigError, match="matched no linear layer"):
        prune_model(model, tokenizer, PruneOptions(method="magnitude", targets=["nothing"]))
    assert PruneOptions(method="wanda", pattern="4:8").nm() == (4, 8)
