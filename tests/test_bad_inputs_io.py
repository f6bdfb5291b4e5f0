"""Bad inputs found by a sweep: each refused with one sentence, exit 2, nothing written.

* an --out that cannot be created (``/proc/x``, a path under a file) -> OutputError;
* a config.json that is not a JSON object (list, string, broken JSON) -> ModelLoadError;
* a config.json that does not match its weights (edited after saving) -> the same
  ModelLoadError from ``slm info`` as from loading (generate, prune, ...);
* ``slm compare`` with a missing or truncated model -> refused before any work, no report.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from slmkit.errors import ModelLoadError, OutputError

UNWRITABLE = "/proc/slmkit-sweep/out"   # /proc refuses new entries, even for root


def _main(*args) -> tuple[int, str]:
    """Run ``slm ARGS`` in this process; the exit code and what went to stderr."""
    import contextlib
    import io

    from slmkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def _assert_refused(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in err, (frag, err)


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def model_copy(tmp_path, llama_dir):
    dst = tmp_path / "model"
    shutil.copytree(llama_dir, dst)
    return dst


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --------------------------------------------------------------------------- 1. --out

needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc").is_dir(),
                                reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("out", [UNWRITABLE, "/proc/slmkit-sweep"])
def test_output_helpers_refuse_an_uncreatable_dir(out):
    from slmkit.models.io import atomic_dir, prepare_out_dir

    with pytest.raises(OutputError, match=f"'{out}'.*choose a writable location"):
        prepare_out_dir(out)
    with pytest.raises(OutputError, match=f"'{out}'"):
        with atomic_dir(out):
            pass


def test_output_under_a_file_is_refused(tmp_path):
    from slmkit.models.io import prepare_out_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file/out"):
        prepare_out_dir(tmp_path / "file" / "out")


@needs_proc
def test_cli_refuses_an_unwritable_out(llama_dir, tmp_path):
    for args in (("compare", llama_dir, "--out", UNWRITABLE),
                 ("tokenizer", "train", "--vocab-size", "300", "--out", UNWRITABLE),
                 ("quantize", llama_dir, "--out", UNWRITABLE)):
        _assert_refused(*_main(*args), UNWRITABLE, "writable")


# --------------------------------------------------------------------------- 2. config.json

@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ('"llama"', "string"),
                                        ('{"model_type": ', "invalid JSON")])
def test_config_json_not_an_object(model_copy, text, kind):
    import slmkit
    from slmkit.models.info import model_info

    (model_copy / "config.json").write_text(text)
    want = f"'{model_copy / 'config.json'}' is not a JSON object"
    for fn in (model_info, slmkit.load_model):
        with pytest.raises(ModelLoadError) as err:
            fn(model_copy)
        assert str(err.value).startswith(want) and kind in str(err.value)


def test_cli_config_json_not_an_object(model_copy):
    (model_copy / "config.json").write_text("[]")
    for args in (("info", model_copy), ("generate", model_copy, "hi")):
        _assert_refused(*_main(*args), str(model_copy / "config.json"), "not a JSON object")


# --------------------------------------------------------------------------- 3. config vs weights

@pytest.mark.parametrize("changes, needle", [
    ({"hidden_size": 128}, "in model.safetensors, but the config makes it"),
    ({"num_hidden_layers": 3}, "'model.layers.2.input_layernorm.weight' is missing"),
    ({"num_hidden_layers": 1}, "which the config has no place for"),
])
def test_info_refuses_what_loading_refuses(model_copy, changes, needle):
    import slmkit
    from slmkit.models.info import model_info

    _edit_config(model_copy, **changes)
    with pytest.raises(ModelLoadError) as from_info:
        model_info(model_copy)
    with pytest.raises(ModelLoadError) as from_load:
        slmkit.load_model(model_copy)
    assert str(from_info.value) == str(from_load.value)  # one check, one message
    assert str(from_info.value).startswith(f"'{model_copy}' has weights that do not match its "
                                           "config.json") and needle in str(from_info.value)


def test_cli_info_and_generate_refuse_a_mismatched_config(model_copy):
    _edit_config(model_copy, hidden_size=128)
    results = [_main("info", model_copy), _main("generate", model_copy, "hi")]
    for code, err in results:
        _assert_refused(code, err, str(model_copy), "do not match its config.json")
    assert results[0][1] == results[1][1]


def test_every_architecture_matches_its_own_config(tiny_model_dirs):
    """Mixtral (per-expert keys on disk, fused experts in the model) and GPT-2 (tied head
    left out of the file) pass the check unchanged."""
    from slmkit.models.info import model_info

    for arch, path in tiny_model_dirs.items():
        assert model_info(path, sparsity=False)["params"] > 0, arch


def test_hub_style_checkpoint_still_loads(tiny_model_dirs, tmp_path):
    """No false alarms: GPT-2 as the hub stores it (no 'transformer.' prefix, old attention
    buffers transformers drops) passes the check and loads the same weights."""
    import torch
    from safetensors.torch import load_file, save_file

    import slmkit
    from slmkit.models.info import model_info

    hub = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dirs["gpt2"], hub)
    state = {k.removeprefix("transformer."): v
             for k, v in load_file(hub / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, hub / "model.safetensors", metadata={"format": "pt"})
    assert model_info(hub, sparsity=False)["params"] > 0
    model, _ = slmkit.load_model(hub, tokenizer=False)
    assert torch.equal(model.transformer.wte.weight, state["wte.weight"])


def test_weights_missing_a_tensor_are_refused(model_copy):
    from safetensors.torch import load_file, save_file

    from slmkit.models.info import model_info

    f = model_copy / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        model_info(model_copy)


# --------------------------------------------------------------------------- 4. compare

def _truncate(model_dir: Path) -> None:
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def test_compare_refuses_unloadable_models_up_front(llama_dir, model_copy, tmp_path,
                                                     monkeypatch):
    import slmkit.eval.evaluate as evaluate
    from slmkit.eval.compare import compare

    ran = []
    monkeypatch.setattr(evaluate, "evaluate_model", lambda ref, **kw: ran.append(ref))
    _truncate(model_copy)
    missing = tmp_path / "no-such-model"
    for refs, needle in (([str(missing), str(llama_dir)], f"'{missing}' does not exist"),
                         ([str(llama_dir), str(model_copy)], "model.safetensors' is truncated")):
        with pytest.raises(ModelLoadError, match=needle):
            compare(refs, tmp_path / "report")
        assert _leftovers(tmp_path, "report") == []
    assert ran == []  # refused before any model ran


def test_cli_compare_refuses_missing_and_truncated(llama_dir, model_copy, tmp_path):
    _truncate(model_copy)
    missing = tmp_path / "no-such-model"
    for args, needle in ((("compare", missing, llama_dir), str(missing)),
                         (("compare", llama_dir, model_copy), str(model_copy))):
        _assert_refused(*_main(*args, "--out", tmp_path / "D"), needle)
        assert _leftovers(tmp_path, "D") == []


def test_compare_keeps_a_row_for_a_model_that_fails_inside_slmkit(tiny_model_dirs, tmp_path,
                                                                   monkeypatch):
    """Not the user's input: a crash inside slmkit while one model runs (a bug) keeps that
    model's row, with its error, and the report of the others is still written."""
    import slmkit.eval.evaluate as evaluate
    from slmkit.eval.compare import compare

    real = evaluate.evaluate_model
    gpt2 = str(tiny_model_dirs["gpt2"])

    def flaky(ref, **kw):
        if str(ref) == gpt2:
            raise RuntimeError("format loader bug")
        return real(ref, **kw)

    monkeypatch.setattr(evaluate, "evaluate_model", flaky)
    res = compare([str(tiny_model_dirs["llama"]), gpt2], tmp_path / "report", max_bytes=1500,
                  speed=False, task_specs=[], seq_len=64)
    rows = {m["label"]: m for m in res["models"]}
    assert rows["llama"]["error"] is None and "format loader bug" in rows["gpt2"]["error"]
    assert "format loader bug" in (tmp_path / "report" / "report.md").read_text()
