"""The batching engine serves a model whose LM head is quantized too."""

from __future__ import annotations

import pytest
import torch

from slmkit.engine import Engine, SamplingParams
from slmkit.models.presets import output_vocab_size
from tests.conftest import build_tiny_model


def test_engine_with_quantized_lm_head(tokenizer):
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions

    model = build_tiny_model("llama", tokenizer)
    quantize_model(model, tokenizer, QuantizeOptions(method="rtn", bits=8, ignore=[]))
    head = model.get_output_embeddings()
    assert getattr(head, "weight", None) is None or not isinstance(head, torch.nn.Linear)
    assert output_vocab_size(model) == len(tokenizer)
    engine = Engine(model, tokenizer, max_batch=2, background=False)
    handle = engine.submit([5, 17, 42], SamplingParams(max_tokens=4, temperature=0.0,
                                                       ignore_eos=True))
    while not handle.done:
        engine.step()
    assert len(handle.result().token_ids) == 4


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (8, 32, False), (4, 32, True),
                                            (4, 64, False), (4, -1, True)])
def test_native_embedding_rows_equal_the_module(bits, group, sym):
    """The decode step's native lookup of a quantized embedding gives the module's rows
    bit for bit, and refuses ids outside the table."""
    from slmkit.engine import native
    from slmkit.nn.quant_embedding import QuantEmbedding

    lib = native.load_library()
    if lib is None:
        pytest.skip(f"native step unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    emb = QuantEmbedding.from_embedding(torch.nn.Embedding(300, 128), bits, group, sym)
    embed = native.quant_embedder(lib, emb)
    ids = torch.tensor([0, 5, 299, 5, 17])
    assert torch.equal(embed(ids), emb(ids))
    with pytest.raises(IndexError):
        embed(torch.tensor([3, 300]))
    assert native.quant_embedder(lib, torch.nn.Embedding(10, 8)) is None
