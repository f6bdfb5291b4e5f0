"""Sparsity survives a later quantization: pruned zeros stay exactly zero."""

from __future__ import annotations

import pytest

from slmkit.compress.match import match_linears
from slmkit.compress.prune.modifier import PruneOptions, prune_model
from tests.conftest import build_tiny_model
from tests.test_prune_model import calib_corpus  # noqa: F401  (shared fixture)


def _prune_then_quantize(tokenizer, corpus, tmp_path, **quant):
    from slmkit.compress.quantize.api import dequantize_model, quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.models import load_model, save_model

    model = build_tiny_model("llama", tokenizer)
    prune_model(model, tokenizer, PruneOptions(method="magnitude", pattern="2:4"))
    masks = {n: (m.weight == 0).clone() for n, m in match_linears(model).items()}
    out = save_model(model, tokenizer, tmp_path / "pruned", step="prune")
    model, _ = load_model(out)  # through save/load first
    quantize_model(model, tokenizer, QuantizeOptions(calib_data=corpus, calib_samples=8,
                                                    calib_seq_len=32, group_size=32, **quant))
    qdir = save_model(model, tokenizer, tmp_path / "quant", step="quantize")
    dense = dequantize_model(load_model(qdir)[0])
    linears = match_linears(dense)
    return {n: int((linears[n].weight[mask] != 0).sum()) for n, mask in masks.items()}, masks


@pytest.mark.parametrize("quant", [dict(method="rtn", bits=8),
                                   dict(method="rtn", bits=4, sym=False),
                                   dict(method="awq", bits=4)])
def test_pruned_zeros_stay_zero_through_quantization(quant, tokenizer, tmp_path,
                                                     calib_corpus):  # noqa: F811
    refilled, masks = _prune_then_quantize(tokenizer, calib_corpus, tmp_path, **quant)
    assert sum(int(m.sum()) for m in masks.values()) > 0
    assert sum(refilled.values()) == 0, refilled


def test_pruned_zeros_stay_zero_through_gptq(tokenizer, tmp_path, calib_corpus):  # noqa: F811
    refilled, _ = _prune_then_quantize(tokenizer, calib_corpus, tmp_path, method="gptq", bits=4)
    assert sum(refilled.values()) == 0


def test_compressed_models_are_refused(tokenizer, calib_corpus):  # noqa: F811
    from slmkit.compress.factorize.modifier import FactorizeOptions, factorize_model
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.errors import ConfigError

    model = build_tiny_model("llama", tokenizer)
    quantize_model(model, tokenizer, QuantizeOptions(method="rtn", bits=8))
    with pytest.raises(ConfigError, match="already compressed"):
        prune_model(model, tokenizer, PruneOptions(method="magnitude"))
    with pytest.raises(ConfigError, match="already compressed"):
        factorize_model(model, tokenizer, FactorizeOptions(method="svd"))
