"""Every bad model input gives one sentence naming the input, exit code 2, no traceback."""

from __future__ import annotations

import shutil

import pytest


def _assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in err, (frag, err)


@pytest.fixture
def broken(tmp_path, llama_dir):
    """A fresh copy of a good model dir to break in one way."""
    dst = tmp_path / "model"
    shutil.copytree(llama_dir, dst)
    return dst


def test_missing_directory(cli, tmp_path):
    path = tmp_path / "nope" / "model"
    _assert_user_error(cli("info", path), str(path), "does not exist")


def test_no_config_json(cli, broken):
    (broken / "config.json").unlink()
    _assert_user_error(cli("info", broken), str(broken), "no config.json")


def test_non_causal_architecture(cli, tmp_path):
    from transformers import BertConfig

    d = tmp_path / "bert"
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(d)
    _assert_user_error(cli("info", d), str(d), "not a causal language model")


def test_truncated_safetensors(cli, broken):
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _assert_user_error(cli("info", broken), "model.safetensors", "truncated")


def test_corrupt_safetensors(cli, broken):
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    _assert_user_error(cli("info", broken), "model.safetensors", "not a valid safetensors")


def test_pickle_only_checkpoint_is_refused(cli, broken):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    _assert_user_error(cli("info", broken), "pickle", "arbitrary code", "safetensors")


def test_missing_tokenizer(cli, broken, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink(missing_ok=True)
    _assert_user_error(cli("init", "--preset", "nano", "--tokenizer", broken, "--out",
                           tmp_path / "out"), str(broken), "no tokenizer")
    assert not (tmp_path / "out").exists()


def test_load_model_missing_tokenizer_in_python(broken):
    import slmkit

    (broken / "tokenizer.json").unlink()
    with pytest.raises(slmkit.errors.ModelLoadError, match="no tokenizer"):
        slmkit.load_model(broken)


def test_debug_shows_traceback(cli, tmp_path):
    result = cli("--debug", "info", tmp_path / "missing")
    assert result.returncode != 0 and "Traceback" in result.stderr
