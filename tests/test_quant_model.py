"""Whole-model quantization: every architecture, save/load, dequantize, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.compress.quantize import (
    dequantize_model,
    is_quantized,
    make_config,
    quantize_model,
)
from slmkit.errors import ConfigError, DataError
from slmkit.models import load_model, save_model
from slmkit.nn.quant_linear import QuantLinear, set_kernel_mode
from tests.conftest import ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """A small corpus dir (30 stdlib files) and a private token cache."""
    from slmkit.models.tokenizer import stdlib_sample

    root = tmp_path_factory.mktemp("calib")
    for i, text in enumerate(stdlib_sample(max_files=30, max_bytes=400_000)):
        (root / f"doc{i}.py").write_text(text)
    mp = pytest.MonkeyPatch()
    mp.setenv("SLMKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield root
    mp.undo()


def _cfg(calib_dir, **kw):
    base = dict(method="rtn", bits=4, group_size=32, calib_data=str(calib_dir),
                calib_samples=8, calib_seq_len=64)
    return make_config(**{**base, **kw})


def _exact_logits(model, x):
    """Logits through the dense-fallback kernels: fp32 and deterministic (the packed bf16
    kernels may round differently from run to run under multi-threading)."""
    set_kernel_mode("dequant")
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        set_kernel_mode("auto")


def _ids(tokenizer, n=48):
    text = "def quantize(weight, bits):\n    return round(weight * 2 ** bits)\n" * 4
    return torch.tensor(tokenizer(text)["input_ids"][:n])[None]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_quantizes_saves_and_reloads(arch, tokenizer, calib_dir, tmp_path):
    model = build_tiny_model(arch, tokenizer)
    x = _ids(tokenizer)
    with torch.no_grad():
        dense = model(x).logits
    summary = quantize_model(model, tokenizer, _cfg(calib_dir, method="gptq"))
    assert summary["layers"] > 0 and summary["bits_per_weight"] == pytest.approx(4.5)
    assert is_quantized(model)
    assert not any(type(m).__name__ in ("Linear", "Conv1D") and "layers" in n
                   for n, m in model.named_modules() if n.count(".") >= 4)
    with torch.no_grad():
        quant = model(x).logits
    rel = float((quant - dense).abs().mean() / dense.abs().mean())
    assert rel < 0.2, f"{arch}: quantized logits drift {rel:.2%}"
    save_model(model, tokenizer, tmp_path / arch, step="quantize")
    loaded, _ = load_model(tmp_path / arch)
    table = {id(loaded.get_input_embeddings()), id(loaded.get_output_embeddings())}
    assert sum(isinstance(m, QuantLinear) and id(m) not in table
               for m in loaded.modules()) == summary["layers"]
    # the table is int8 by default, or kept dense where the model's embedding cannot be
    assert isinstance(loaded.get_input_embeddings(), QuantLinear) != \
        summary["embeddings"].startswith("kept dense"), summary["embeddings"]
    torch.testing.assert_close(_exact_logits(loaded, x), _exact_logits(model, x))
    with torch.no_grad():  # the real kernels agree too, to bf16 precision
        torch.testing.assert_close(loaded(x).logits, quant, atol=0.05, rtol=0.02)


def test_awq_folds_scales_on_llama_and_keeps_them_inside_on_gpt2(tokenizer, calib_dir,
                                                                 tmp_path):
    from slmkit.compress.quantize.awq_mappings import block_mappings, fold_scale

    llama = build_tiny_model("llama", tokenizer)
    block = llama.model.layers[0]
    linears = {f"model.layers.0.{n}": m for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)}
    entries = block_mappings("llama", block, "model.layers.0", linears)
    assert [(type(p).__name__, [n.rsplit(".", 1)[1] for n in names]) for p, names in entries] \
        == [("LlamaRMSNorm", ["q_proj", "k_proj", "v_proj"]),  # v -> o: GQA, not foldable
            ("LlamaRMSNorm", ["gate_proj", "up_proj"]), ("Linear", ["down_proj"])]
    x = _ids(tokenizer)
    with torch.no_grad():
        before = llama(x).logits
        for producer, names in entries:  # folding alone never changes the function
            fold_scale(producer, [linears[n] for n in names],
                       torch.rand(producer.weight.shape[0]) + 0.5)
        torch.testing.assert_close(llama(x).logits, before, atol=1e-4, rtol=1e-4)

    # Salient input channels (as in trained LLMs) make AWQ scale them.
    llama = build_tiny_model("llama", tokenizer)
    for layer in llama.model.layers:
        layer.input_layernorm.weight.data[:4] *= 30
    norm = llama.model.layers[0].input_layernorm.weight.detach().clone()
    quantize_model(llama, tokenizer, _cfg(calib_dir, method="awq", awq_grid=8))
    kept = {n.rsplit(".", 1)[1] for n, m in llama.named_modules()
            if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert kept <= {"o_proj"}  # everything else folded into a norm or a linear
    assert not torch.allclose(llama.model.layers[0].input_layernorm.weight, norm)

    gpt2 = build_tiny_model("gpt2", tokenizer)
    for block in gpt2.transformer.h:
        block.ln_1.weight.data[:4] *= 30
    quantize_model(gpt2, tokenizer, _cfg(calib_dir, method="awq", awq_grid=8))
    scaled = [n for n, m in gpt2.named_modules() if isinstance(m, QuantLinear)
              and m.input_scale is not None]
    assert "transformer.h.0.attn.c_attn" in scaled  # no mapping for GPT-2: kept inside
    assert all(gpt2.get_submodule(n).conv1d for n in scaled)
    save_model(gpt2, tokenizer, tmp_path / "gpt2", step="quantize")
    loaded, _ = load_model(tmp_path / "gpt2")
    torch.testing.assert_close(_exact_logits(loaded, x), _exact_logits(gpt2, x))


def test_dequantize_gives_a_plain_transformers_model(tokenizer, calib_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("qwen2", tokenizer)
    quantize_model(model, tokenizer, _cfg(calib_dir))
    x = _ids(tokenizer)
    quant = _exact_logits(model, x)
    dequantize_model(model)
    save_model(model, tokenizer, tmp_path / "dense", step="dequantize")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "slmkit" not in config and "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, quant, atol=1e-4, rtol=1e-4)


def test_4bit_g128_file_is_under_30_percent_of_fp16(tokenizer, tmp_path):
    from safetensors import safe_open

    model = build_tiny_model("llama", tokenizer, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=4)
    dense_params = sum(p.numel() for n, p in model.named_parameters()
                       if "embed" not in n and "lm_head" not in n)
    quantize_model(model, tokenizer, make_config(method="rtn", bits=4, group_size=128))
    save_model(model, tokenizer, tmp_path / "q", step="quantize")
    stored = 0
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as st:
        for k in st.keys():
            if "embed" not in k and "lm_head" not in k:
                t = st.get_tensor(k)
                stored += t.numel() * t.element_size()
    assert stored <= 0.30 * dense_params * 2


def test_bad_input_is_refused_clearly(tokenizer, calib_dir, tmp_path):
    model = build_tiny_model("llama", tokenizer)
    with pytest.raises(ConfigError, match="does not divide the 64 input features"):
        quantize_model(model, tokenizer, _cfg(calib_dir, group_size=128))
    with pytest.raises(ConfigError, match="No linear layer matches"):
        quantize_model(model, tokenizer, _cfg(calib_dir, targets=["nothing_here"]))
    with pytest.raises(DataError, match="has only .* tokens"):
        quantize_model(model, tokenizer, _cfg(calib_dir, method="gptq", calib_samples=2000,
                                              calib_seq_len=512))
    quantize_model(model, tokenizer, _cfg(calib_dir))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, tokenizer, _cfg(calib_dir))


@pytest.mark.slow
def test_cli_quantize_info_requantize_and_dequantize(llama_dir, calib_dir, tmp_path, cli):
    import os

    env = {"SLMKIT_CACHE_DIR": os.environ["SLMKIT_CACHE_DIR"]}
    out = tmp_path / "q"
    r = cli("quantize", llama_dir, "--out", out, "--method", "gptq", "--bits", "4",
            "--group-size", "32", "--calib-data", calib_dir, "--calib-samples", "8",
            "--calib-seq-len", "64", env=env)
    assert r.returncode == 0, r.stderr
    assert "bits per weight" in r.stdout and "4.500" in r.stdout
    from slmkit.models.info import model_info

    data = model_info(out)
    assert data["format"] == "quant" and data["compression"]["bits_per_weight"] == 4.5
    assert data["params"] == model_info(llama_dir)["params"]  # packed int4 counted as weights
    again = cli("quantize", out, "--out", tmp_path / "qq", env=env)
    assert again.returncode == 2 and "already quantized" in again.stderr
    assert "Traceback" not in again.stderr and not (tmp_path / "qq").exists()
    dense = cli("quantize", out, "--dequantize", "--out", tmp_path / "dense")
    assert dense.returncode == 0, dense.stderr
    assert model_info(tmp_path / "dense")["format"] == "dense"


@pytest.mark.parametrize("bits,group,emb_bits", [(8, -1, None), (4, 32, None), (3, 32, None),
                                                 (4, 32, 4), (3, 32, 4)])
def test_quantize_embeddings_ties_the_head_to_the_same_codes(bits, group, emb_bits, tokenizer,
                                                             calib_dir, tmp_path):
    from slmkit.engine import stream_tokens
    from slmkit.nn.quant_embedding import QuantEmbedding

    model = build_tiny_model("llama", tokenizer, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().clone()
    x = _ids(tokenizer)
    with torch.no_grad():
        dense = model(x).logits
    summary = quantize_model(model, tokenizer, _cfg(calib_dir, bits=bits, group_size=group,
                                                    quantize_embeddings=True,
                                                    embedding_bits=emb_bits))
    emb, head = model.model.embed_tokens, model.lm_head
    # the table has its own grid (int8 per row, the default) or the linears' 4-bit one
    tb, tg = (8, -1) if (emb_bits or 8) == 8 else (emb_bits, group)
    assert model.model.layers[0].mlp.up_proj.bits == bits
    assert (emb.bits, emb.group_size, head.bits, head.group_size) == (tb, tg, tb, tg)
    assert isinstance(emb, QuantEmbedding) and type(head) is QuantLinear
    assert "tied lm_head" in summary["embeddings"]
    assert torch.equal(emb.qweight, head.qweight) and torch.equal(emb.scales, head.scales)
    # a lookup returns exactly the dequantized rows, and they are close to the fp32 table
    rows = emb(x)
    torch.testing.assert_close(rows[0], emb.dequantize_weight()[x[0]])
    err = float((emb.dequantize_weight() - table).abs().mean() / table.abs().mean())
    assert 0 < err < {8: 0.02, 4: 0.2, 3: 0.35}[tb]
    rel = float((_exact_logits(model, x) - dense).abs().mean() / dense.abs().mean())
    assert rel < {8: 0.05, 4: 0.3, 3: 0.55}[bits]

    save_model(model, tokenizer, tmp_path / "q", step="quantize")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, _ = load_model(tmp_path / "q")
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert (loaded.model.embed_tokens.bits, loaded.lm_head.bits) == (tb, tb)
    torch.testing.assert_close(_exact_logits(loaded, x), _exact_logits(model, x))
    prompt = x[0, :8].tolist()
    assert list(stream_tokens(loaded, prompt, 6)) == list(stream_tokens(model, prompt, 6))
    dequantize_model(loaded)
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding
    torch.testing.assert_close(loaded.model.embed_tokens.weight, emb.dequantize_weight())


def test_embedding_bits_needs_quantize_embeddings_and_a_known_width():
    with pytest.raises(ConfigError, match="--embedding-bits needs a quantized embedding"):
        make_config(quantize_embeddings=False, embedding_bits=8)
    assert make_config().embedding_grid() == (8, -1)     # the default: int8 per row
    with pytest.raises(ConfigError, match="--embedding-bits 3 is not supported"):
        make_config(quantize_embeddings=True, embedding_bits=3)


def test_quantize_embeddings_refuses_a_group_that_does_not_divide_the_width(tokenizer,
                                                                           calib_dir):
    model = build_tiny_model("llama", tokenizer)
    width = model.model.embed_tokens.embedding_dim
    with pytest.raises(ConfigError, match="embedding"):
        quantize_model(model, tokenizer, _cfg(calib_dir, bits=4, group_size=width * 2,
                                              quantize_embeddings=True, embedding_bits=4))


@pytest.mark.parametrize("entry", [0, 1])   # q/k/v scored on the attention, gate/up on the MLP
def test_awq_module_search_never_worse_than_scale_one(tokenizer, calib_dir, entry):
    """A folded entry's scale is chosen on the output of the module holding its linears
    (attention: on whole sequences; MLP: on a token sample); s = 1 (plain RTN) is a
    candidate, so the chosen scale's module error is never above RTN's, and salient
    channels move it away from 1."""
    from slmkit.compress.calibrate import capture_block_inputs
    from slmkit.compress.match import set_weight_matrix, weight_matrix
    from slmkit.compress.quantize.awq_mappings import block_mappings
    from slmkit.compress.quantize.modifiers import AWQModifier, _mixes_tokens, _scope
    from slmkit.compress.quantize.ops import fake_quantize

    model = build_tiny_model("llama", tokenizer)
    for layer in model.model.layers:
        layer.input_layernorm.weight.data[:4] *= 30          # salient channels
        layer.post_attention_layernorm.weight.data[:4] *= 30
    block, prefix = model.model.layers[0], "model.layers.0"
    linears = {f"{prefix}.{n}": m for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)}
    cfg = _cfg(calib_dir, method="awq", awq_grid=8)
    mod = AWQModifier(cfg, linears, "llama")
    inputs = capture_block_inputs(model, [_ids(tokenizer)])
    xs, outputs = mod._collect(block, inputs, linears)
    for o, r in zip(outputs, inputs.run(block)):
        torch.testing.assert_close(o, r)                     # the pass is the fp block
    mappings = block_mappings("llama", block, prefix, linears)
    names = [m for m in mappings if len(m[1]) > 1][entry][1]  # q/k/v, then gate/up
    scope = _scope(block, prefix, names)
    assert scope is (block.self_attn if entry == 0 else block.mlp)
    assert _mixes_tokens(scope, block) == (entry == 0)
    modules = [linears[n] for n in names]
    ws = [weight_matrix(m).detach().clone() for m in modules]
    if entry == 0:
        args, kwargs, reference = mod._capture_calls(block, inputs, [scope])[id(scope)]
    else:
        args, kwargs, reference = (xs[names[0]][None],), {}, None

    @torch.no_grad()
    def module_error(scale):
        for m, w in zip(modules, ws):
            set_weight_matrix(m, fake_quantize(w * scale, cfg.bits, cfg.group_size, cfg.sym) / scale)
        out = scope(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        for m, w in zip(modules, ws):
            set_weight_matrix(m, w)
        ref = scope(*args, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        return float(((out - ref) ** 2).sum())

    best = mod._search_module_scale(scope, args, kwargs, reference, modules, ws, xs[names[0]])
    for m, w in zip(modules, ws):
        set_weight_matrix(m, w)
    assert not torch.all(best == 1)                           # the salient channels moved it
    assert module_error(best) < module_error(torch.ones_like(best))


def test_default_group_is_picked_from_the_layers_and_recorded(llama_dir, tmp_path):
    import json

    from slmkit.compress.match import match_linears
    from slmkit.compress.quantize import QuantizeConfig, run_quantize
    from slmkit.compress.quantize.ops import auto_group_size
    from slmkit.models import load_model
    from slmkit.nn.surgery import linear_shape

    model, _ = load_model(llama_dir)
    want = auto_group_size(linear_shape(m)[1] for m in match_linears(model, [".*"],
                                                                     ["lm_head"]).values())
    res = run_quantize(QuantizeConfig(model=str(llama_dir), out=str(tmp_path / "q")))
    assert want in (128, 64, 32)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["slmkit"]["group_size"] == want
    assert f"group {want} (the largest" in dict(res.rows)["method"]
    lineage = json.loads((tmp_path / "q" / "slmkit.json").read_text())
    assert lineage["params"]["group_size"] == want


def test_calibration_windows_are_shared_equally_between_corpora(tokenizer, calib_dir, tmp_path):
    """Several calibration corpora share the windows equally and in turn, whatever their
    sizes; one corpus gives the same windows as before."""
    from slmkit.compress.calibrate import calibration_batches

    small = tmp_path / "small.txt"
    small.write_text("zebra quagga okapi " * 400)
    one = calibration_batches(tokenizer, str(calib_dir), n_samples=6, seq_len=16, batch_size=4)
    assert [b.shape for b in one] == [(4, 16), (2, 16)]
    both = torch.cat(calibration_batches(tokenizer, [str(calib_dir), str(small)], n_samples=6,
                                         seq_len=16, batch_size=4))
    small_ids = set(tokenizer(small.read_text())["input_ids"])
    from_small = [set(row.tolist()) <= small_ids for row in both]
    assert from_small == [False, True] * 3


def test_gptq_true_sequential_off_collects_every_hessian_in_one_pass(tokenizer, calib_dir):
    """Off, every group's Hessian comes from the unquantized block: in the first block,
    q/k/v (nothing is quantized before them in either mode) get the same codes, and the
    last group (down) differs."""
    first = {}
    for ts in (True, False):
        model = build_tiny_model("llama", tokenizer)
        quantize_model(model, tokenizer, _cfg(calib_dir, method="gptq", true_sequential=ts))
        first[ts] = {n: model.model.layers[0].get_submodule(n).qweight.clone()
                     for n in ("self_attn.q_proj", "mlp.down_proj")}
    assert torch.equal(first[True]["self_attn.q_proj"], first[False]["self_attn.q_proj"])
    assert not torch.equal(first[True]["mlp.down_proj"], first[False]["mlp.down_proj"])


def test_untied_head_quantized_as_a_linear_loads_on_the_linears_grid(tokenizer, tmp_path):
    """An untied LM head selected by the patterns is on the linears' grid (4-bit here), the
    table on its own (int8 per row): both come back as saved, and `slm info` counts each
    on its own grid."""
    from slmkit.compress.quantize import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.models.info import model_info

    model = build_tiny_model("llama", tokenizer, tie_word_embeddings=False)
    dense = sum(p.numel() for p in model.parameters())
    quantize_model(model, None, QuantizeOptions(method="rtn", bits=4, group_size=32,
                                                ignore=[]))
    assert model.lm_head.bits == 4 and model.model.embed_tokens.bits == 8
    ids = torch.tensor([[5, 9, 30, 7]])
    out = save_model(model, tokenizer, tmp_path / "q", step="quantize", params={})
    back, _ = load_model(str(out), dtype="fp32")
    assert back.lm_head.bits == 4 and back.model.embed_tokens.bits == 8
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert model_info(out)["params"] == dense
    config = json.loads((out / "config.json").read_text())   # a dir from before the record
    del config["slmkit"]["embedding_layers"]
    (out / "config.json").write_text(json.dumps(config))
    assert model_info(out)["params"] == dense


def test_expert_passes_batch_a_stage_of_split_experts():
    """GPTQ / SparseGPT feed a block once per group, except a split mixture's experts: all
    gate|up linears of a module in one pass, then all downs, where the first of them ran
    (groups in execution order interleave them; unused experts come last)."""
    from slmkit.compress.calibrate import expert_passes

    e = "model.layers.0.mlp.experts"
    groups = [["q", "k", "v"], ["o"], ["shared.gate", "shared.up"], [f"{e}.gate_up.2"],
              [f"{e}.down.2"], [f"{e}.gate_up.0"], [f"{e}.down.0"], ["shared.down"],
              [f"{e}.gate_up.1"], [f"{e}.down.1"]]
    assert expert_passes(groups) == [
        [["q", "k", "v"]], [["o"]], [["shared.gate", "shared.up"]],
        [[f"{e}.gate_up.2"], [f"{e}.gate_up.0"], [f"{e}.gate_up.1"]],
        [[f"{e}.down.2"], [f"{e}.down.0"], [f"{e}.down.1"]], [["shared.down"]]]
