"""GGUF export: metadata round-trips through ``gguf.GGUFReader``, tensors are what they
say they are, quantized models keep their calibrated blocks, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.errors import ConfigError, OutputError
from slmkit.export import ggml_blocks
from slmkit.export.gguf_export import export_gguf
from slmkit.export.gguf_meta import permute_rope_rows
from tests.conftest import run_cli

gguf = pytest.importorskip("gguf")


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_metadata_round_trips(arch, tiny_model_dirs, tokenizer, tmp_path):
    from transformers import AutoConfig

    model_dir = tiny_model_dirs[arch]
    cfg = AutoConfig.from_pretrained(model_dir)
    out = tmp_path / "m.gguf"
    res = export_gguf(str(model_dir), out, quant="f32")
    reader, f = _fields(out)
    a = "qwen2" if arch == "qwen2" else "llama"
    assert f["general.architecture"] == a == res.arch
    assert f[f"{a}.embedding_length"] == cfg.hidden_size
    assert f[f"{a}.block_count"] == cfg.num_hidden_layers
    assert f[f"{a}.feed_forward_length"] == cfg.intermediate_size
    assert f[f"{a}.attention.head_count"] == cfg.num_attention_heads
    assert f[f"{a}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f[f"{a}.rope.dimension_count"] == cfg.hidden_size // cfg.num_attention_heads
    assert f[f"{a}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    ctx = min(256, cfg.sliding_window) if arch == "mistral" else 256
    assert f[f"{a}.context_length"] == ctx
    # tokenizer: vocab in id order, merges, specials, template, a pre-tokenizer llama.cpp knows
    vocab = tokenizer.get_vocab()
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.merges"][0].count(" ") == 1
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert f["tokenizer.ggml.eot_token_id"] == vocab["<|im_end|>"]
    assert f["tokenizer.ggml.token_type"][tokenizer.pad_token_id] == 3      # control
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tokenizer.chat_template


def test_f32_tensors_hold_the_weights_with_rope_rows_permuted(llama_dir, tmp_path):
    from slmkit.models import load_model

    out = tmp_path / "m.gguf"
    export_gguf(str(llama_dir), out, quant="f32")
    reader, _ = _fields(out)
    t = _tensors(reader)
    model, _ = load_model(llama_dir)
    sd = model.state_dict()
    cfg = model.config
    # GGUF lists dims fastest-first: an nn.Linear [out, in] is declared as [in, out]
    q = t["blk.0.attn_q.weight"]
    assert list(q.shape) == [cfg.hidden_size, cfg.hidden_size]
    assert q.tensor_type == gguf.GGMLQuantizationType.F32
    want_q = permute_rope_rows(sd["model.layers.0.self_attn.q_proj.weight"], 4)
    np.testing.assert_array_equal(np.asarray(q.data), want_q.numpy())
    want_k = permute_rope_rows(sd["model.layers.1.self_attn.k_proj.weight"], 2)
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_k.weight"].data), want_k.numpy())
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_v.weight"].data),
                                  sd["model.layers.1.self_attn.v_proj.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(t["output_norm.weight"].data),
                                  sd["model.norm.weight"].numpy())
    assert "output.weight" in t                                    # untied llama
    assert len(t) == 2 + 1 + 9 * cfg.num_hidden_layers


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_types_and_shapes_are_as_declared(quant, tiny_model_dirs, tmp_path):
    from slmkit.models import load_model

    model_dir = tiny_model_dirs["qwen2"]
    out = tmp_path / f"m-{quant}.gguf"
    res = export_gguf(str(model_dir), out, quant=quant)
    reader, f = _fields(out)
    model, _ = load_model(model_dir)
    sd = model.state_dict()
    want = getattr(gguf.GGMLQuantizationType, quant.upper())
    for t in reader.tensors:
        ndim = len([d for d in t.shape])
        expected = gguf.GGMLQuantizationType.F32 if ndim == 1 else want
        assert t.tensor_type == expected, t.name
        assert t.n_elements == int(np.prod(t.shape))
    v = _tensors(reader)["blk.0.attn_v.weight"]
    w = sd["model.layers.0.self_attn.v_proj.weight"]
    assert list(v.shape) == list(w.shape[::-1])
    if quant in ggml_blocks.QUANTIZERS:                      # the bytes are our packing
        np.testing.assert_array_equal(np.asarray(v.data), ggml_blocks.QUANTIZERS[quant](w))
    assert "blk.0.attn_q.bias" in _tensors(reader)          # qwen2 keeps its q/k/v biases
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}[quant]
    assert res.quant == quant
    assert f["general.file_type"] == getattr(gguf.LlamaFileType, file_type).value


def test_tied_embeddings_write_no_output_tensor(tokenizer, tmp_path):
    from slmkit.models import save_model
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", tokenizer, tie_word_embeddings=True)
    d = save_model(model, tokenizer, tmp_path / "tied", step="init")
    export_gguf(str(d), tmp_path / "t.gguf", quant="f16")
    names = _tensors(gguf.GGUFReader(tmp_path / "t.gguf"))
    assert "token_embd.weight" in names and "output.weight" not in names


def test_quantized_tied_table_is_written_once(tokenizer, tmp_path):
    """`slm quantize` gives a tied head its own copy of the int8 table's codes; the GGUF
    holds the table once (Q8_0) and llama.cpp reuses it as the output layer."""
    from slmkit.compress.quantize import make_config, quantize_model
    from slmkit.models import load_model, save_model
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", tokenizer, tie_word_embeddings=True)
    quantize_model(model, None, make_config(method="rtn", bits=4, group_size=32))
    d = save_model(model, tokenizer, tmp_path / "q", step="quantize")
    loaded, _ = load_model(d)
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
    from slmkit.eval.speed import size_stats
    from slmkit.models.io import load_config

    dense_params = sum(p.numel() for p in build_tiny_model(
        "llama", tokenizer, tie_word_embeddings=True).parameters())
    assert size_stats(d, load_config(d)[1])["params"] == dense_params   # the head counts once
    res = export_gguf(str(d), tmp_path / "q.gguf")
    t = _tensors(gguf.GGUFReader(tmp_path / "q.gguf"))
    assert "output.weight" not in t and t["token_embd.weight"].tensor_type.name == "Q8_0"
    assert res.from_quantized == 15 and res.requantized == 0


def test_ollama_modelfile(llama_dir, tmp_path):
    res = export_gguf(str(llama_dir), tmp_path / "m.gguf", quant="q8_0", ollama=True)
    text = (tmp_path / "Modelfile").read_text()
    assert res.modelfile == tmp_path / "Modelfile"
    assert text.startswith("FROM ./m.gguf\n")
    assert 'TEMPLATE """' in text and "{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text


# ----------------------------------------------------------------------------- quantized models

@pytest.mark.parametrize("bits,sym,group,qtype", [
    (4, True, 32, "q4_0"), (4, False, 32, "q4_1"), (8, True, 32, "q8_0"),
    (4, True, 64, "q4_0"), (4, False, 64, "q4_1"), (8, True, -1, "q8_0"), (4, True, -1, "q4_0")])
def test_quantized_model_blocks_carry_the_calibrated_weights(bits, sym, group, qtype, llama_dir,
                                                             tmp_path):
    """Groups of 32, of a multiple of 32 (each 32-column block repeats its group's scale)
    and per channel all map onto GGML blocks exactly."""
    from slmkit.compress.quantize import make_config, quantize_model
    from slmkit.models import load_model, save_model

    model, tok = load_model(llama_dir)
    quantize_model(model, tok, make_config(method="rtn", bits=bits, group_size=group, sym=sym))
    qdir = save_model(model, tok, tmp_path / "q", step="quantize")
    out = tmp_path / "q.gguf"
    res = export_gguf(str(qdir), out)
    # 14 linears and the int8 table (the default; this model's untied head stays dense)
    assert res.quant == qtype and res.from_quantized == 15 and res.requantized == 0
    t = _tensors(gguf.GGUFReader(out))
    assert t["token_embd.weight"].tensor_type.name == "Q8_0"
    table = model.get_input_embeddings()
    back = ggml_blocks.dequantize(np.array(t["token_embd.weight"].data), "q8_0",
                                  table.in_features)
    torch.testing.assert_close(back, table.dequantize_weight(torch.float32), rtol=0, atol=0)
    for hf, name in (("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
                     ("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight")):
        layer = model.get_submodule(hf)
        got = torch.from_numpy(np.array(t[name].data))
        if name.endswith("attn_q.weight"):                   # undo the RoPE row order
            got = got.reshape(4, 8, 2, -1).transpose(1, 2).reshape(got.shape)
        back = ggml_blocks.dequantize(got.numpy(), qtype, layer.in_features)
        want = layer.dequantize_weight(torch.float32)
        tol = 0 if qtype != "q4_1" else float(want.abs().max()) * 2 ** -10
        torch.testing.assert_close(back, want, rtol=0, atol=tol)


def test_quantized_scheme_that_cannot_map_is_refused(llama_dir, tmp_path):
    from slmkit.compress.quantize import make_config, quantize_model
    from slmkit.models import load_model, save_model

    model, tok = load_model(llama_dir)
    quantize_model(model, tok, make_config(method="rtn", bits=3, group_size=64, sym=True))
    qdir = save_model(model, tok, tmp_path / "q64", step="quantize")
    with pytest.raises(ConfigError, match="3-bit symmetric, group size 64.*--bits 4"):
        export_gguf(str(qdir), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_unsupported_architecture_is_refused(arch, tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match=f"'{arch}' model.*supported: gemma2, gemma3_text, "
                                          "granite, llama, mistral, mixtral, phi3, qwen2, "
                                          "qwen2_moe, qwen3"):
        export_gguf(str(tiny_model_dirs[arch]), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_gpt2_in_one_line(tiny_model_dirs, tmp_path):
    r = run_cli("export", tiny_model_dirs["gpt2"], "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "'gpt2'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_output_in_missing_directory_is_refused(llama_dir, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        export_gguf(str(llama_dir), tmp_path / "no" / "m.gguf")


def test_existing_output_needs_overwrite_and_bad_quant_is_refused(llama_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="--overwrite"):
        export_gguf(str(llama_dir), out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(ConfigError, match="q4_1"):
        export_gguf(str(llama_dir), tmp_path / "n.gguf", quant="q5_k")


def test_failure_while_writing_leaves_no_file(llama_dir, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError):
        export_gguf(str(llama_dir), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_a_result_table(llama_dir, tmp_path):
    r = run_cli("export", llama_dir, "--format", "gguf", "--out", tmp_path / "m.gguf",
                "--quant", "q4_0", "--ollama")
    assert r.returncode == 0, r.stderr
    for word in ("slm export --format gguf", "q4_0", "gpt-2", "bits per weight", "ollama"):
        assert word in r.stdout


def test_padding_rows_past_the_tokenizer_are_unused_tokens(tokenizer, tmp_path):
    """Embedding rows no token maps to are typed UNUSED (5), not BYTE (6): llama.cpp would
    otherwise detokenize them as stray bytes."""
    from slmkit.models import save_model
    from tests.conftest import build_tiny_model

    n = len(tokenizer)
    model = build_tiny_model("llama", tokenizer, vocab_size=n + 16)
    save_model(model, tokenizer, tmp_path / "m", step="test")
    export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", quant="f32")
    _, f = _fields(tmp_path / "m.gguf")
    types = f["tokenizer.ggml.token_type"]
    assert len(types) == n + 16
    assert all(types[i] == int(gguf.TokenType.UNUSED) for i in range(n, n + 16))
    assert types[0] == int(gguf.TokenType.NORMAL) or types[0] == int(gguf.TokenType.CONTROL)


# ------------------------------------------------------- SentencePiece-style tokenizers

def _sentencepiece_tokenizer(prefix: bool):
    """A small SentencePiece-style BPE (byte fallback, '▁' for a space) trained on the
    stdlib, as transformers converts Llama 2's (``prefix``: a '▁' before the text) or
    Gemma's (none) ``tokenizer.model``; the ``<0xNN>`` pieces in the vocabulary."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slmkit.models.tokenizer import stdlib_sample

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    pieces = [f"<0x{i:02X}>" for i in range(256)]
    texts = list(stdlib_sample(max_files=20, max_bytes=300_000))
    # trained on words ('▁' starts one: SentencePiece's pieces), then run without a
    # pre-tokenizer as transformers' converted tokenizers are (training on the unsplit text
    # takes a minute)
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"] + pieces,
        limit_alphabet=120, show_progress=False))
    bpe.pre_tokenizer = None
    spec = json.loads(bpe.to_str())            # byte pieces are vocabulary, not added tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in pieces]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    snippets = [t[i:i + 300] for t in texts for i in range(0, min(len(t), 12000), 300)]
    return tok, snippets + ["héllo wörld ✓ 𝔘 tab\there  two  spaces\n", "  leading", "x"]


@pytest.fixture(scope="module", params=[True, False], ids=["llama2-style", "gemma-style"])
def sentencepiece_gguf(request, tmp_path_factory):
    from slmkit.models import save_model
    from tests.conftest import build_tiny_model

    tok, texts = _sentencepiece_tokenizer(request.param)
    root = tmp_path_factory.mktemp("spm")
    model = build_tiny_model("llama", tok, seed=1)
    model_dir = save_model(model, tok, root / "src", step="init", params={})
    path = root / "spm.gguf"
    export_gguf(str(model_dir), path, quant="f32")
    return tok, texts, path, request.param, root


def test_sentencepiece_tokenizer_is_written_as_llamacpps_llama_model(sentencepiece_gguf):
    """tokenizer.ggml.model 'llama': the pieces, a score each (minus the rank of the merge
    that makes the piece), <0xNN> pieces BYTE, the unknown piece UNKNOWN, and whether a
    space goes before the text."""
    import gguf

    tok, _, path, prefix, _ = sentencepiece_gguf
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key].contents()

    assert field("tokenizer.ggml.model") == "llama"
    assert bool(field("tokenizer.ggml.add_space_prefix")) is prefix
    tokens, types, scores = (field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"),
                             field("tokenizer.ggml.scores"))
    vocab = tok.get_vocab()
    assert types[vocab["<0x41>"]] == 6 and types[vocab["<unk>"]] == 2
    assert types[vocab["<s>"]] == 3 and tokens[vocab["<0x41>"]] == "<0x41>"
    merges = tok.backend_tokenizer.to_str()
    import json

    first = json.loads(merges)["model"]["merges"][0]
    a, b = first.split(" ") if isinstance(first, str) else first
    assert scores[vocab[a + b]] == 0.0 and min(scores[:len(vocab)]) < -100


def test_sentencepiece_tokenizer_round_trips_through_import(sentencepiece_gguf):
    """`slm import` of the file (transformers' reader, with llama.cpp's text preparation
    put back: a '▁' before the text only where the file says so) tokenizes stdlib snippets,
    unicode past the vocabulary (byte fallback) and leading spaces as the source did."""
    from slmkit.models import load_model
    from slmkit.models.gguf_import import import_gguf

    tok, texts, path, _, root = sentencepiece_gguf
    _, back = load_model(str(import_gguf(path, root / f"back-{path.stat().st_mtime_ns}",
                                         str(path))), dtype="fp32")
    for text in texts:
        assert back(text, add_special_tokens=False)["input_ids"] == \
            tok(text, add_special_tokens=False)["input_ids"], text[:60]
        assert back.decode(tok(text, add_special_tokens=False)["input_ids"]) == \
            tok.decode(tok(text, add_special_tokens=False)["input_ids"])


def test_sentencepiece_tokenizer_tokenizes_the_same_in_llamacpp(sentencepiece_gguf):
    """llama.cpp itself (llama-cpp-python; skipped without it) splits every snippet into
    the source tokenizer's ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok, texts, path, _, _ = sentencepiece_gguf
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                tok(text, add_special_tokens=False)["input_ids"], text[:60]
    finally:
        llm.close()
