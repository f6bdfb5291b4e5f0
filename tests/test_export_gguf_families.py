"""GGUF export of the families llama.cpp has beyond Llama and Qwen2 (Qwen3, Phi-3, Gemma 2,
Gemma 3, Qwen2-MoE), checked by a round trip: the file slmkit writes, imported back by slmkit's own
GGUF import (transformers' reader, which undoes llama.cpp's conventions), gives the source
model's logits. f32 exactly; q8_0 / q4_0 equal the source model with its weights rounded
to the same blocks (so the layout is exact) and stay near the f32 logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.errors import ConfigError
from slmkit.export import ggml_blocks
from slmkit.export.gguf_export import export_gguf
from tests.conftest import build_tiny_model, run_cli

gguf = pytest.importorskip("gguf")

#: The tiny configs, made llama.cpp-faithful where the shared ones test other things: Gemma
#: scales queries by 1/sqrt(head_dim) in llama.cpp (the tiny configs use 64 / 256), and
#: Gemma 3's sliding layers are five in six (the default layer_types), not every other one.
FAMILIES = {
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {"sliding_window": 24}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 32}),
    "gemma3_text": ("gemma3", {"query_pre_attn_scalar": 32, "layer_types": None}),
    "qwen2_moe": ("qwen2moe", {}),    # 3-D experts split into gate / up, shared expert
}
#: families llama.cpp runs whose files transformers cannot read back: checked by llama.cpp
LLAMACPP_ONLY = {"granite": "granite", "mixtral": "llama"}
IDS = torch.tensor([list(range(5, 45))])      # 40 tokens: past the 16- and 24-token windows


@pytest.fixture(scope="module")
def sources(tokenizer, tmp_path_factory):
    from slmkit.models import save_model

    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for kind, (_, over) in FAMILIES.items():
        model = build_tiny_model(kind, tokenizer, seed=1, **over)
        with torch.no_grad():       # non-trivial norm weights: Gemma's 1 + w must be kept
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
        out[kind] = (model, save_model(model, tokenizer, root / kind, step="init", params={}))
    return out


def _round_trip(model_dir, quant, tmp_path, kind):
    from slmkit.models import load_model
    from slmkit.models.gguf_import import import_gguf

    path = tmp_path / f"{kind}-{quant}.gguf"
    res = export_gguf(str(model_dir), path, quant=quant)
    back, _ = load_model(str(import_gguf(path, tmp_path / f"{kind}-{quant}", str(path))),
                         dtype="fp32")
    return res, back


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits[0]


def _rounded(model, quant):
    """``model`` with every weight the export packs in ``quant`` blocks rounded to them."""
    import copy

    from gguf.quants import dequantize

    qtype = getattr(gguf.GGMLQuantizationType, quant.upper())
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():   # matrices, a mixture's 3-D experts
            if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                continue                              # the routers stay f32
            if p.dim() in (2, 3) and p.shape[-1] % ggml_blocks.QK == 0:
                blocks = ggml_blocks.QUANTIZERS[quant](p.detach().float().reshape(-1, p.shape[-1]))
                p.copy_(torch.from_numpy(np.asarray(dequantize(blocks, qtype))).view_as(p))
    return out


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_f32_round_trip_gives_the_same_logits(kind, sources, tmp_path):
    model, model_dir = sources[kind]
    res, back = _round_trip(model_dir, "f32", tmp_path, kind)
    assert res.arch == FAMILIES[kind][0]
    assert type(back) is type(model)
    assert torch.equal(_logits(back), _logits(model))


@pytest.mark.parametrize("quant, near", [("q8_0", 0.1), ("q4_0", 0.5)])
@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "qwen2_moe"])
def test_quantized_round_trip_is_the_block_rounded_model(kind, quant, near, sources, tmp_path):
    model, model_dir = sources[kind]
    res, back = _round_trip(model_dir, quant, tmp_path, kind)
    assert res.types[quant] > 0
    got, want = _logits(back), _logits(_rounded(model, quant))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # and near the dense model: the logits' relative RMS error
    ref = _logits(model)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"{kind} {quant}: relative RMS logit error {rel:.4f}")
    assert rel < near


def test_gemma_norms_are_written_as_one_plus_w(sources, tmp_path):
    model, model_dir = sources["gemma2"]
    path = tmp_path / "g.gguf"
    export_gguf(str(model_dir), path, quant="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    w = model.model.layers[0].post_feedforward_layernorm.weight.detach()
    np.testing.assert_array_equal(tensors["blk.0.post_ffw_norm.weight"].data, (w + 1).numpy())
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
    assert fields["gemma2.attention.sliding_window"] == 16
    assert fields["gemma2.attention.key_length"] == 32
    assert fields["gemma2.context_length"] == 256       # the window is declared, not the ctx


@pytest.mark.parametrize("kind, what", [("gemma2", "1/sqrt\\(64\\)"),
                                        ("gemma3_text", "1/sqrt\\(256\\)")])
def test_gemma_config_llamacpp_would_run_differently_is_refused(kind, what, tiny_model_dirs,
                                                                tmp_path):
    with pytest.raises(ConfigError, match=f"'{kind}' model that scales queries by {what}"):
        export_gguf(str(tiny_model_dirs[kind]), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gemma3_layer_pattern_other_than_llamacpps_is_refused(tokenizer, tmp_path):
    from slmkit.models import save_model

    model = build_tiny_model("gemma3_text", tokenizer, query_pre_attn_scalar=32)
    src = save_model(model, tokenizer, tmp_path / "m", step="init", params={})
    with pytest.raises(ConfigError, match="sliding-window layers"):
        export_gguf(str(src), tmp_path / "x.gguf")


@pytest.mark.slow
def test_cli_export_then_import_gemma3(sources, tmp_path):
    """The user's path: `slm export --format gguf`, then `slm import`, then `slm generate`
    on the imported dir writes what the source model writes (greedy)."""
    _, model_dir = sources["gemma3_text"]
    path = tmp_path / "m.gguf"
    r = run_cli("export", model_dir, "--format", "gguf", "--quant", "f32", "--out", path)
    assert r.returncode == 0, r.stderr
    r = run_cli("import", path, "--out", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    outs = [run_cli("generate", d, "def add(a, b):", "--temperature", "0", "--max-tokens", "12")
            for d in (model_dir, tmp_path / "back")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    texts = [o.stdout.split("\nslm generate")[0] for o in outs]   # the text, not the timings
    assert texts[0] == texts[1] and len(texts[0]) > len("def add(a, b):")


@pytest.fixture(scope="module")
def llamacpp_only(tokenizer, tmp_path_factory):
    """``{kind: (model, dir)}`` of :data:`LLAMACPP_ONLY` (larger weights: logits far from flat)."""
    from slmkit.models import save_model

    root = tmp_path_factory.mktemp("gguf-llamacpp-only")
    out = {}
    for kind in LLAMACPP_ONLY:
        model = build_tiny_model(kind, tokenizer, seed=1, initializer_range=0.2)
        out[kind] = (model, save_model(model, tokenizer, root / kind, step="init", params={}))
    return out


@pytest.fixture(scope="module")
def granite(llamacpp_only):
    return llamacpp_only["granite"]


def test_granite_writes_llamacpps_multipliers_and_rope_rows(granite, tmp_path):
    """llama.cpp's granite graph scales the embedding, the residual adds, the attention
    scores and the logits by four keys of the file; q/k rows go in llama.cpp's RoPE order."""
    from slmkit.export.gguf_meta import permute_rope_rows

    model, model_dir = granite
    path = tmp_path / "granite.gguf"
    export_gguf(str(model_dir), path, quant="f32")
    reader = gguf.GGUFReader(path)
    cfg = model.config

    def value(key):
        field = reader.fields[key]
        return float(field.parts[field.data[0]][0])

    assert reader.fields["general.architecture"].contents() == "granite"
    for key, want in [("embedding_scale", cfg.embedding_multiplier),
                      ("residual_scale", cfg.residual_multiplier),
                      ("attention.scale", cfg.attention_multiplier),
                      ("logit_scale", cfg.logits_scaling)]:
        assert value(f"granite.{key}") == pytest.approx(want), key
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    src = model.model.layers[0].self_attn.q_proj.weight.detach()
    want = permute_rope_rows(src, cfg.num_attention_heads).numpy()
    np.testing.assert_array_equal(np.asarray(q.data).reshape(want.shape), want)


@pytest.mark.parametrize("kind,quant,rel", [("granite", "f32", 1e-4), ("granite", "q8_0", 0.05),
                                            ("qwen2_moe", "f32", 1e-4), ("mixtral", "f32", 1e-4)])
def test_gguf_gives_the_models_logits_in_llamacpp(kind, quant, rel, llamacpp_only, sources,
                                                  tmp_path):
    """The file run by llama.cpp itself (llama-cpp-python, the ``llamacpp`` extra; skipped
    without it), with an f32 KV cache: its logits over 40 tokens equal the source model's
    (f32), or stay near them (q8_0, where llama.cpp also rounds activations). Granite and
    Mixtral have no transformers GGUF reader, so this is their only check; Qwen2-MoE's and
    Mixtral's routing are llama.cpp's own graphs here."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, model_dir = llamacpp_only[kind] if kind in LLAMACPP_ONLY else sources[kind]
    path = tmp_path / f"{kind}-{quant}.gguf"
    export_gguf(str(model_dir), path, quant=quant)
    ids = IDS[0].tolist()
    with torch.no_grad():
        want = model(IDS).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False, type_k=0, type_v=0)     # GGML_TYPE_F32 cache
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)])
    finally:
        llm.close()
    assert np.abs(got - want).max() < rel * np.abs(want).max()


def test_mixtral_is_written_as_llamas_graph_with_experts_and_import_refuses_it(
        tokenizer, tmp_path):
    """Mixtral goes to llama.cpp's ``llama`` graph with ``expert_count`` / ``expert_used_count``
    and the fused experts split into ``ffn_gate_exps`` / ``ffn_up_exps`` (router f32).
    transformers would read such a file back as a plain Llama without experts, so `slm
    import` refuses it in one sentence."""
    from slmkit.errors import ModelLoadError
    from slmkit.models import save_model
    from slmkit.models.gguf_import import import_gguf

    model = build_tiny_model("mixtral", tokenizer, seed=1)
    model_dir = save_model(model, tokenizer, tmp_path / "mixtral", step="init", params={})
    path = tmp_path / "mixtral.gguf"
    res = export_gguf(str(model_dir), path, quant="q8_0")
    assert res.arch == "llama"
    reader = gguf.GGUFReader(path)
    cfg = model.config
    assert reader.fields["llama.expert_count"].contents() == cfg.num_local_experts
    assert reader.fields["llama.expert_used_count"].contents() == cfg.num_experts_per_tok
    tensors = {t.name: t for t in reader.tensors}
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert [int(d) for d in gate.shape] == [cfg.hidden_size, cfg.intermediate_size,
                                            cfg.num_local_experts]
    assert gate.tensor_type.name == "Q8_0"
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    with pytest.raises(ModelLoadError, match="mixture of experts.*'llama' graph"):
        import_gguf(path, tmp_path / "back", str(path))
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_are_carried_into_gguf_exactly(bits, sources, tmp_path):
    """A Qwen2-MoE whose experts slmkit quantized (split, one linear per expert) is written
    with its experts' own codes stacked into ``ffn_{gate,up,down}_exps`` (q8_0 / q4_0): read
    back by `slm import`, its logits equal the quantized model's (dequantized) ones."""
    import copy

    from slmkit.compress.quantize import quantize_model
    from slmkit.compress.quantize.api import dequantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.models import load_model, save_model

    model, _ = sources["qwen2_moe"]
    model = copy.deepcopy(model)
    quantize_model(model, None, QuantizeOptions(method="rtn", bits=bits, group_size=32,
                                                quantize_embeddings=False))
    src = save_model(model, None, tmp_path / "q", step="quantize", params={})
    _copy_tokenizer(sources, src)
    res, back = _round_trip(src, f"q{bits}_0", tmp_path, "qwen2_moe-q")
    experts = sum(p.numel() for n, p in back.named_parameters() if ".experts." in n)
    assert experts > 0 and res.requantized == 0
    assert res.from_quantized == len([n for n, m in model.named_modules()   # the shared
                                      if type(m).__name__ == "QuantLinear"      # gate: f32
                                      and not n.endswith("shared_expert_gate")])
    # the tensors left dense (embedding, head) go to q8_0 / q4_0 blocks; the quantized
    # layers keep their codes
    want = _logits(dequantize_model(_rounded(load_model(str(src), dtype="fp32")[0],
                                             f"q{bits}_0")))
    torch.testing.assert_close(_logits(back), want, atol=1e-5, rtol=0)


def _copy_tokenizer(sources, dst) -> None:
    import shutil

    _, model_dir = sources["qwen2_moe"]
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("bits,near", [(8, 0.03), (4, 0.03)])
def test_quantized_experts_run_in_llamacpp(kind, bits, near, tokenizer, tmp_path):
    """llama.cpp itself runs a mixture whose experts slmkit quantized (skipped without
    llama-cpp-python): over 40 tokens its logits stay near the quantized model's own (the
    embedding table rounded to the file's blocks as the export does; llama.cpp also rounds
    activations to 8 bits). A decisive router keeps that rounding from flipping experts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from slmkit.compress.quantize import quantize_model
    from slmkit.compress.quantize.api import dequantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.models import load_model, save_model

    model = build_tiny_model(kind, tokenizer, seed=1, initializer_range=0.05)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8)
    quantize_model(model, None, QuantizeOptions(method="rtn", bits=bits, group_size=32,
                                                quantize_embeddings=False, ignore=[]))
    src = save_model(model, tokenizer, tmp_path / "q", step="quantize", params={})
    path = tmp_path / "q.gguf"
    res = export_gguf(str(src), path)
    assert res.requantized == 0 and res.types[f"q{bits}_0"] > 0
    ref = dequantize_model(_rounded(load_model(str(src), dtype="fp32")[0], f"q{bits}_0"))
    want = _logits(ref).numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(IDS[0].tolist())
        got = np.asarray(llm.scores[:IDS.shape[1]])
    finally:
        llm.close()
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{kind} q{bits}_0 in llama.cpp: relative RMS logit error {rel:.4f}")
    assert rel < near
