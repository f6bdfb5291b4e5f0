"""The batching engine serves a model whose LM head is quantized too."""

from __future__ import annotations

import torch

from slmkit.engine import Engine, SamplingParams
from slmkit.models.presets import output_vocab_size
from tests.conftest import build_tiny_model


def test_engine_with_quantized_lm_head(tokenizer):
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeConfig

    model = build_tiny_model("llama", tokenizer)
    quantize_model(model, tokenizer, QuantizeConfig(method="rtn", bits=8, ignore=[]))
    head = model.get_output_embeddings()
    assert getattr(head, "weight", None) is None or not isinstance(head, torch.nn.Linear)
    assert output_vocab_size(model) == len(tokenizer)
    engine = Engine(model, tokenizer, max_batch=2, background=False)
    handle = engine.submit([5, 17, 42], SamplingParams(max_tokens=4, temperature=0.0,
                                                       ignore_eos=True))
    while not handle.done:
        engine.step()
    assert len(handle.result().token_ids) == 4
