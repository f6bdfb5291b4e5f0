"""Low-rank factorization of whole tiny models: ranks, save/load, merge, CLI, bad input."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.factorize.modifier import FactorizeOptions, factorize_model
from slmkit.errors import ConfigError, validated
from slmkit.models import load_model, save_model
from slmkit.nn.lowrank import LowRankLinear, lowrank_modules, merge_lowrank
from tests.conftest import build_tiny_model, run_cli
from tests.test_prune_model import calib_corpus  # noqa: F401  (shared fixture)


def _ids(tokenizer) -> torch.Tensor:
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    pass\n"
    return torch.tensor([tokenizer(text)["input_ids"][:32]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_svd_ratio_sets_ranks_and_round_trips(arch, tokenizer, tmp_path):
    model = build_tiny_model(arch, tokenizer)
    report = factorize_model(model, tokenizer, FactorizeOptions(method="svd", ratio=0.5))
    assert len(report.ranks) == 14 and not report.skipped
    assert report.factored_params <= 0.5 * report.dense_params
    low = lowrank_modules(model)
    assert set(low) == set(report.ranks)
    q = low["model.layers.0.self_attn.q_proj"]
    assert q.rank == 64 * 64 // 2 // 128 and (q.B.bias is not None) == (arch == "qwen2")
    ids = _ids(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    out = save_model(model, tokenizer, tmp_path / "low", step="factorize")
    loaded, _ = load_model(out)
    assert {n: m.rank for n, m in lowrank_modules(loaded).items()} == report.ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, atol=1e-4, rtol=1e-4)
    merge_lowrank(loaded)
    assert not lowrank_modules(loaded) and getattr(loaded.config, "slmkit", None) is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_energy_leaves_unhelpful_layers_dense(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        q.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64))  # genuinely rank 4
    report = factorize_model(model, tokenizer, FactorizeOptions(method="svd", energy=0.99))
    # random weights have a flat spectrum: at 99% energy they cannot save parameters
    assert report.ranks == {"model.layers.0.self_attn.q_proj": 4}
    assert len(report.skipped) == 13
    for name in report.skipped:
        assert isinstance(model.get_submodule(name), torch.nn.Linear)


def test_asvd_beats_svd_on_the_model_output(tokenizer, calib_corpus):  # noqa: F811
    from slmkit.compress.calibrate import calibration_batches

    def outlier_model():
        """A tiny Llama whose norms give 4 channels 8x larger activations: the outlier
        features of trained LLMs that ASVD exists for (a random model has none, and then
        ASVD's margin over SVD is within run-to-run noise)."""
        model = build_tiny_model("llama", tokenizer)
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[:4] *= 8.0
        return model

    base = outlier_model()
    ids = calibration_batches(tokenizer, calib_corpus, n_samples=8, seq_len=32, seed=2)[0]
    with torch.no_grad():
        ref = base(ids).logits
    errs = {}
    for method in ("svd", "asvd"):
        model = outlier_model()
        factorize_model(model, tokenizer, FactorizeOptions(
            method=method, ratio=0.6, calib_data=calib_corpus, calib_samples=8, calib_seq_len=32))
        assert any(isinstance(m, LowRankLinear) for m in model.modules())
        with torch.no_grad():
            errs[method] = float((model(ids).logits - ref).pow(2).mean())
    assert errs["asvd"] < errs["svd"], errs


def test_bad_settings_are_refused(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    with pytest.raises(ConfigError, match="gives rank 0"):
        factorize_model(model, tokenizer, FactorizeOptions(method="svd", ratio=0.01))
    with pytest.raises(ConfigError, match="only one"):
        validated(FactorizeOptions, ratio=0.5, energy=0.9)
    with pytest.raises(ConfigError, match="--energy"):
        validated(FactorizeOptions, energy=1.5)
    with pytest.raises(ConfigError, match="Conv1D"):
        factorize_model(build_tiny_model("gpt2", tokenizer), tokenizer, FactorizeOptions())
    assert not lowrank_modules(model)  # refused before touching the model


@pytest.mark.slow
def test_cli_factorize_info_and_merge(llama_dir, tmp_path):
    low = tmp_path / "low"
    res = run_cli("factorize", llama_dir, "--method", "svd", "--ratio", "0.5", "--out", low)
    assert res.returncode == 0, res.stderr
    assert "ranks per layer" in res.stdout and "lowrank" in res.stdout
    from slmkit.models.info import model_info

    info = model_info(low)
    assert info["format"] == "lowrank" and len(info["compression"]["ranks"]) == 14
    dense = tmp_path / "dense"
    res = run_cli("factorize", low, "--merge", "--out", dense)
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(dense)  # plain transformers loads the merge
