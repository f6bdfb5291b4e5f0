"""`slm train` through the real CLI: output dir, lineage, resume, kill -9, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(40):
        (d / f"m{i:02d}.py").write_text(
            f"def f{i}(x):\n    '''Return x times {i}.'''\n    return x * {i}\n" * 8)
    (d / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 50)
    return d


@pytest.fixture
def env(tmp_path):
    return {"SLMKIT_CACHE_DIR": str(tmp_path / "cache")}


def _train(llama_dir, corpus, out, env, *extra):
    return run_cli("train", "--model", llama_dir, "--data", corpus, "--out", out,
                   "--seq-len", "32", "--batch-size", "2", "--eval-every", "2",
                   "--checkpoint-every", "2", "--val-fraction", "0.2", "--warmup-steps", "1",
                   "--precision", "fp32", *extra, env=env)


@pytest.mark.slow
def test_train_writes_model_dir_and_resumes(llama_dir, corpus, tmp_path, env):
    out = tmp_path / "run"
    r = _train(llama_dir, corpus, out, env, "--max-steps", "4")
    assert r.returncode == 0, r.stderr
    for key in ("val bits/byte", "tokens/s", "skipped (binary)", "loss_curve.png"):
        assert key in r.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)          # a plain HF dir, no slmkit needed
    record = json.loads((out / "slmkit.json").read_text())
    assert record["step"] == "train" and record["parent"] == str(llama_dir)
    assert record["metrics"]["steps"] == 4 and record["params"]["seq_len"] == 32
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]

    again = _train(llama_dir, corpus, out, env, "--max-steps", "4")
    assert again.returncode == 2 and "--resume" in again.stderr

    more = _train(llama_dir, corpus, out, env, "--max-steps", "6", "--resume")
    assert more.returncode == 0, more.stderr
    record = json.loads((out / "slmkit.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    assert record["metrics"]["steps"] == 6 and [r["step"] for r in log["history"]][-1] == 6
    assert [r["step"] for r in log["history"]] == [4, 6]       # history survives resume


@pytest.mark.slow
def test_kill_9_loses_at_most_one_interval(llama_dir, corpus, tmp_path, env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slmkit.cli", "train", "--model", str(llama_dir), "--data",
           str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "2",
           "--max-steps", "100000", "--checkpoint-every", "3", "--eval-every", "1000",
           "--precision", "fp32"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "checkpoints" / "step-00000006").is_dir():
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "checkpoints" / "step-00000006").is_dir(), "training made no progress"
    assert not (out / "config.json").exists()       # unfinished runs have no model files
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()
             if p.name.startswith("step-")]
    r = run_cli("train", "--model", llama_dir, "--data", corpus, "--out", out, "--seq-len",
                "32", "--batch-size", "2", "--max-steps", str(max(steps) + 1),
                "--checkpoint-every", "3", "--precision", "fp32", "--resume", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "slmkit.json").read_text())["metrics"]["steps"] == max(steps) + 1


def test_cli_bad_input_exits_2_without_output(llama_dir, tmp_path, env):
    out = tmp_path / "out"
    r = run_cli("train", "--model", llama_dir, "--max-steps", "1", "--data",
                tmp_path / "none-*.txt", "--out", out, env=env)
    assert r.returncode == 2 and "matches no files" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = run_cli("train", "--model", llama_dir, "--out", out, env=env)
    assert r.returncode == 2 and "training budget" in r.stderr and not out.exists()


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(model="nano", max_steps=1), "ConfigError", "needs --tokenizer"),
    (dict(model="{llama}", max_steps=1, seq_len=4096), "ConfigError", "exceeds the model's"),
    (dict(model="{tmp}/missing-model", max_steps=1), "ModelLoadError", "does not exist"),
    (dict(model="{llama}", max_steps=1, precision="fp8"), "ConfigError", "--precision"),
    (dict(model="{llama}", max_steps=1, data="{tmp}/empty"), "DataError", "has no documents"),
])
def test_bad_inputs_raise_one_sentence(llama_dir, tmp_path, env, monkeypatch, kwargs, error,
                                       fragment):
    from slmkit import errors
    from slmkit.train.config import TrainConfig
    from slmkit.errors import validated
    from slmkit.train.run import run_train

    monkeypatch.setenv("SLMKIT_CACHE_DIR", env["SLMKIT_CACHE_DIR"])
    (tmp_path / "empty").mkdir()
    kwargs = {k: v.replace("{llama}", str(llama_dir)).replace("{tmp}", str(tmp_path))
              if isinstance(v, str) else v for k, v in kwargs.items()}
    out = tmp_path / "out"
    with pytest.raises(getattr(errors, error), match=fragment):
        run_train(validated(TrainConfig, **kwargs, out=str(out)))
    assert not out.exists()


def test_continued_pretraining_with_jsonl(llama_dir, tmp_path, env, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE_DIR", env["SLMKIT_CACHE_DIR"])
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {i}+{i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(60)]
    rows += [{"prompt": f"Q{i}: ", "completion": f"A{i}."} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from slmkit.train.config import TrainConfig
    from slmkit.train.run import run_train

    res = run_train(TrainConfig(model=str(llama_dir), data=str(data),
                                   out=str(tmp_path / "o"), max_steps=2, seq_len=32,
                                   batch_size=2, val_fraction=0.2, precision="fp32"))
    assert res.figures["steps"] == 2 and res.figures["val_loss"] > 0
