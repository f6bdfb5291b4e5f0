"""Save/load round trips, lineage, plain-transformers compatibility, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import slmkit
from slmkit.errors import OutputError
from slmkit.models.lineage import read_lineage
from tests.conftest import ARCHS, build_tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8]])


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_identical_logits_and_lineage(arch, tiny_model_dirs, tmp_path):
    src = tiny_model_dirs[arch]
    model, tok = slmkit.load_model(src)
    assert len(model.slmkit_lineage) == 1
    with torch.no_grad():
        before = model(IDS).logits
    out = slmkit.save_model(model, tok, tmp_path / "copy", step="copy", params={"why": "test"},
                            metrics={"x": 1.5})
    again, _ = slmkit.load_model(out)
    with torch.no_grad():
        after = again(IDS).logits
    assert torch.equal(before, after)
    chain = read_lineage(out)
    assert [e["step"] for e in chain] == ["init", "copy"]
    assert chain[-1]["params"] == {"why": "test"} and chain[-1]["metrics"] == {"x": 1.5}
    assert chain[-1]["parent"] == str(src)
    # one more step: the chain grows by exactly one
    third = slmkit.save_model(again, tok, tmp_path / "third", step="third")
    assert [e["step"] for e in read_lineage(third)] == ["init", "copy", "third"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_plain_transformers_loads_slmkit_output(arch, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    ours, _ = slmkit.load_model(tiny_model_dirs[arch])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch]).eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, plain(IDS).logits)


def test_tied_embeddings_saved_once_and_stay_tied(tokenizer, tmp_path):
    model = build_tiny_model("llama", tokenizer, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = slmkit.save_model(model, tokenizer, tmp_path / "tied", step="init")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    loaded, _ = slmkit.load_model(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_slmkit_json_record(llama_dir):
    record = json.loads((llama_dir / "slmkit.json").read_text())
    assert record["step"] == "init" and record["slmkit_version"] == slmkit.__version__
    assert record["created_utc"].endswith("Z") and record["lineage"] == []


def test_save_refuses_existing_dir_and_overwrite_replaces(llama_dir, tmp_path):
    model, tok = slmkit.load_model(llama_dir)
    out = tmp_path / "m"
    slmkit.save_model(model, tok, out, step="a")
    with pytest.raises(OutputError, match="already exists"):
        slmkit.save_model(model, tok, out, step="b")
    slmkit.save_model(model, tok, out, step="b", overwrite=True)
    assert read_lineage(out)[-1]["step"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left


def test_crash_during_save_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    model, tok = slmkit.load_model(llama_dir)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        slmkit.save_model(model, tok, tmp_path / "half", step="x")
    assert list(tmp_path.iterdir()) == []


def test_dtype_and_device_options(llama_dir):
    model, _ = slmkit.load_model(llama_dir, dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(slmkit.errors.ConfigError, match="Unknown dtype"):
        slmkit.load_model(llama_dir, dtype="int3")


def test_hub_id_not_cached_is_a_clear_error_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(slmkit.errors.ModelLoadError, match="neither a local directory"):
        slmkit.load_model("no-such-org/no-such-model-xyz")
