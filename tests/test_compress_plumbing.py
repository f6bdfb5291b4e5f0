"""Shared compression plumbing: linear matching, layer-by-layer calibration, Hessians."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.calibrate import (
    calibrate_layer_by_layer,
    capture_linear_inputs,
    find_blocks,
    sequential_groups,
)
from slmkit.compress.hessian import (
    HessianAccumulator,
    cholesky_inverse_upper,
    damp_hessian,
    hessian_reference,
)
from slmkit.compress.match import match_linears, set_weight_matrix, weight_matrix
from slmkit.errors import ConfigError
from tests.conftest import ARCHS, build_tiny_model


def test_match_linears_default_targets_and_ignore(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    names = list(match_linears(model))
    assert "lm_head" not in names
    assert len(names) == 2 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    only_mlp = match_linears(model, targets=[r"mlp\."], ignore=[r"down_proj"])
    assert sorted(n.rsplit(".", 1)[1] for n in only_mlp) == ["gate_proj", "gate_proj",
                                                              "up_proj", "up_proj"]
    within = match_linears(model, within="model.layers.1")
    assert all(n.startswith("model.layers.1.") for n in within) and len(within) == 7


def test_match_linears_gpt2_conv1d_is_seen_as_out_in(tokenizer):
    model = build_tiny_model("gpt2", tokenizer)
    found = match_linears(model)
    c_attn = found["transformer.h.0.attn.c_attn"]
    w = weight_matrix(c_attn)
    assert w.shape == (192, 64)  # [out, in] even though Conv1D stores [in, out]
    x = torch.randn(3, 64)
    assert torch.allclose(c_attn(x), x @ w.t() + c_attn.bias, atol=1e-5)
    set_weight_matrix(c_attn, torch.zeros(192, 64))
    assert torch.count_nonzero(c_attn.weight) == 0


def test_bad_regex_is_a_config_error(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        match_linears(model, targets=["(unclosed"])


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_reproduces_the_dense_forward(tokenizer, arch):
    """With a no-op callback, block i's inputs are exactly the model's hidden state i."""
    model = build_tiny_model(arch, tokenizer)
    torch.manual_seed(0)
    batches = [torch.randint(0, len(tokenizer), (2, 16)) for _ in range(2)]
    with torch.no_grad():
        ref = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    seen = []

    def on_block(i, name, block, inputs):
        assert model.get_submodule(name) is block
        seen.append([h.clone() for h in inputs.hidden])

    calibrate_layer_by_layer(model, batches, on_block)
    _, blocks = find_blocks(model)
    assert len(seen) == len(blocks)
    for i, per_batch in enumerate(seen):
        for b, h in enumerate(per_batch):
            torch.testing.assert_close(h, ref[b][i], atol=1e-5, rtol=1e-4)


def test_compressed_block_outputs_feed_the_next_block(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    batches = [torch.randint(0, len(tokenizer), (2, 8))]
    seen = []

    def on_block(i, name, block, inputs):
        seen.append(inputs.hidden[0].clone())
        if i == 0:  # "compress" block 0 to nothing but the residual path
            for lin in match_linears(block).values():
                lin.weight.data.zero_()

    calibrate_layer_by_layer(model, batches, on_block)
    torch.testing.assert_close(seen[1], seen[0])  # zeroed block 0 is the identity


def test_sequential_groups_llama_and_linear_inputs(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    batches = [torch.randint(0, len(tokenizer), (2, 8))]
    got = {}

    def on_block(i, name, block, inputs):
        if i:
            return
        linears = match_linears(model, within=name)
        groups = sequential_groups(block, inputs, linears)
        got["groups"] = [[n.rsplit(".", 1)[1] for n in g] for g in groups]
        xs = {}
        with capture_linear_inputs(linears, lambda n, x: xs.setdefault(n, x)):
            inputs.run(block)
        got["shapes"] = {n.rsplit(".", 1)[1]: tuple(x.shape) for n, x in xs.items()}

    calibrate_layer_by_layer(model, batches, on_block)
    assert got["groups"] == [["q_proj", "k_proj", "v_proj"], ["o_proj"],
                             ["gate_proj", "up_proj"], ["down_proj"]]
    assert got["shapes"]["down_proj"] == (16, 128) and got["shapes"]["q_proj"] == (16, 64)


def test_hessian_accumulator_matches_reference_over_chunks():
    torch.manual_seed(0)
    x = torch.randn(300, 12) @ torch.randn(12, 12)  # correlated inputs
    acc = HessianAccumulator(12)
    for chunk in x.split(77):
        acc.add(chunk)
    assert acc.num_tokens == 300
    torch.testing.assert_close(acc.hessian.double(), hessian_reference(x), atol=1e-4,
                               rtol=1e-4)
    # bf16 mode: the Hessian of the bf16-rounded inputs (what an autocast product reads),
    # each batch's total rounded to bf16 once
    fast = HessianAccumulator(12, bf16=True)
    for chunk in x.split(77):
        fast.add(chunk)
    ref = hessian_reference(x.bfloat16().double())
    err = (fast.hessian.double() - ref).abs().max() / ref.abs().max()
    assert fast.num_tokens == 300 and 0 < err < 2 ** -8


def test_damped_cholesky_inverse_and_dead_inputs():
    torch.manual_seed(0)
    x = torch.randn(200, 10)
    x[:, 3] = 0  # a dead input channel
    h = hessian_reference(x).float()
    u = cholesky_inverse_upper(h, damp=0.01)
    assert torch.equal(u, torch.triu(u))
    expect = torch.linalg.inv(damp_hessian(h, 0.01).double())
    torch.testing.assert_close(u.double().t() @ u.double(), expect, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="--damp"):
        damp_hessian(h, 1.5)
