"""ONNX export: the KV-cache decoder graph equals the HF model, the exported file validates,
ONNX Runtime's logits and greedy text match PyTorch, --int8 works, bad input is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from slmkit.errors import ConfigError, ModelLoadError, OutputError
from tests.conftest import build_tiny_model, run_cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 6}),
    # the other families: q/k norms, fused q/k/v with RoPE on half of each head, Granite's
    # multipliers, Gemma's four norms, caps and sliding layers (window 16: 24 tokens pass it)
    ("qwen3", {}), ("phi3", {"partial_rotary_factor": 0.5}), ("granite", {}),
    ("gemma2", {"attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0}),
    ("gemma3_text", {}),
    # mixtures: top-k routing as a scattered weight matrix over every expert
    ("mixtral", {}), ("qwen2_moe", {})])
def test_decoder_graph_matches_hf_in_prefill_and_cached_steps(arch, overrides, tokenizer):
    from slmkit.export.onnx_graph import ExportDecoder

    model = build_tiny_model(arch, tokenizer, initializer_range=0.2, **overrides)
    if arch == "mistral":
        model.config._attn_implementation = "eager"
    decoder = ExportDecoder(model).eval()
    n = 24
    ids = torch.randint(0, len(tokenizer), (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits                                   # [2, n, V]
        out = decoder(ids[:, :9], *decoder.empty_past(2))          # prefill 9
        parts, past = [out[0]], out[1:]
        for j in range(9, n):                                      # cached steps
            out = decoder(ids[:, j:j + 1], *past)
            parts.append(out[0])
            past = out[1:]
    got = torch.cat(parts, dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert past[0].shape == (2, decoder.n_kv, n, decoder.head_dim)


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2_moe",
                                  pytest.param("phi3", marks=pytest.mark.slow)])
def test_family_export_runs_in_onnx_runtime(arch, tokenizer, tmp_path):
    """The whole export of a non-Llama family: ONNX Runtime's logits over a 40-token probe
    (prefill and cached steps, past the window of 16; a mixture's routing) and its greedy
    tokens match PyTorch."""
    from slmkit.export.onnx_export import export_onnx
    from slmkit.models import save_model

    extra = {"partial_rotary_factor": 0.5} if arch == "phi3" else {}
    model = build_tiny_model(arch, tokenizer, seed=1, initializer_range=0.2, **extra)
    src = save_model(model, tokenizer, tmp_path / arch, step="init", params={})
    res = export_onnx(str(src), tmp_path / "onnx", probe_tokens=40)
    assert res.max_logit_error < 1e-4 and res.greedy_match




def test_decoder_refuses_other_architectures(tiny_model_dirs):
    from slmkit.export.onnx_graph import ExportDecoder
    from slmkit.models import load_model

    model, _ = load_model(tiny_model_dirs["gpt2"])
    with pytest.raises(ConfigError, match="'gpt2'"):
        ExportDecoder(model)


@pytest.fixture(scope="module")
def onnx_dir(llama_dir, tmp_path_factory):
    """One real export through the CLI, shared by the tests below."""
    out = tmp_path_factory.mktemp("onnx") / "llama-onnx"
    r = run_cli("export", llama_dir, "--format", "onnx", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "slm export --format onnx" in r.stdout and "max |Δlogit|" in r.stdout
    return out


@pytest.mark.slow
def test_export_validates_and_declares_dynamic_cache_inputs(onnx_dir):
    model = onnx.load(str(onnx_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["past_key_0"] == ["batch", 2, "past", 16]
    assert len(inputs) == 1 + 2 * 2
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits" and outputs[-1] == "present_value_1"
    for name in ("config.json", "tokenizer.json", "onnx.json", "slmkit.json"):
        assert (onnx_dir / name).is_file()


@pytest.mark.slow
def test_runtime_logits_and_greedy_text_match_pytorch(onnx_dir, llama_dir):
    from slmkit.export.onnx_runner import OnnxRunner
    from slmkit.models import load_model

    model, tok = load_model(llama_dir)
    runner = OnnxRunner(onnx_dir)
    ids = tok("def parse(self, text):\n    return", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    for prefill in (1, len(ids) - 3, len(ids)):      # empty-past steps, mixed, one prefill
        np.testing.assert_allclose(runner.logits(ids, prefill=prefill), want, atol=1e-4,
                                   rtol=1e-4)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12, pad_token_id=tok.pad_token_id)[0, len(ids):]
    assert list(runner.stream_tokens(ids, 12, stop_at_eos=False)) == ref.tolist()
    ref = ref.tolist()
    if tok.eos_token_id in ref:                                   # generate() stops at eos
        ref = ref[: ref.index(tok.eos_token_id) + 1]
    text = runner.generate("def parse(self, text):\n    return", max_new_tokens=12)
    assert text == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.slow
def test_int8_dynamic_quantization(onnx_dir, tmp_path):
    from slmkit.export.onnx_export import _check, _quantize_int8
    from slmkit.export.onnx_runner import OnnxRunner

    q_dir = tmp_path / "int8"
    shutil.copytree(onnx_dir, q_dir)
    _quantize_int8(onnx_dir / "model.onnx", q_dir / "model.onnx")
    _check(q_dir / "model.onnx")
    ops = {n.op_type for n in onnx.load(str(q_dir / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    assert (q_dir / "model.onnx").stat().st_size < (onnx_dir / "model.onnx").stat().st_size
    ids = list(range(5, 25))
    fp = OnnxRunner(onnx_dir).logits(ids)
    q8 = OnnxRunner(q_dir).logits(ids)
    err = np.abs(q8 - fp).max()
    assert 0 < err < 0.1 * np.abs(fp).max()                        # int8, not a different model


@pytest.mark.slow
def test_bad_input(onnx_dir, tiny_model_dirs, tmp_path):
    from slmkit.export.onnx_export import export_onnx
    from slmkit.export.onnx_runner import OnnxRunner

    with pytest.raises(OutputError, match="already exists"):
        export_onnx(str(tiny_model_dirs["llama"]), onnx_dir)
    with pytest.raises(ConfigError, match="'gpt2'"):
        export_onnx(str(tiny_model_dirs["gpt2"]), tmp_path / "g")
    assert not (tmp_path / "g").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ModelLoadError, match="not an ONNX export"):
        OnnxRunner(tiny_model_dirs["llama"])


def test_int8_on_a_mixture_of_experts_is_refused(tiny_model_dirs, tmp_path):
    """Dynamic int8 would leave the experts' Einsum fp32: refused before anything is
    written, rather than quantizing only the attention."""
    from slmkit.export.onnx_export import export_onnx

    with pytest.raises(ConfigError, match="--int8 on 'mixtral'.*export without --int8"):
        export_onnx(tiny_model_dirs["mixtral"], tmp_path / "onnx", int8=True)
    assert not (tmp_path / "onnx").exists()
