"""`slm train` / `slm finetune` / `slm distill` under torchrun: 2 gloo processes on loopback.

The same command run by one process and by ``torchrun --nproc-per-node 2`` must train the
same model (loss curve within float noise, the global batch is the command's), write exactly
one output dir (rank 0's, lineage with ``world_size``), resume from a checkpoint written at
another world size, and fail with a clear message, not hang, when one rank is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slmkit.train.distributed import Dist, check_world, shard_bounds


def test_shard_bounds_cover_rows_once():
    for rows in range(1, 9):
        for world in range(1, rows + 1):
            parts = [shard_bounds(rows, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1


def test_one_process_is_a_no_op():
    d = Dist()
    batch = {"input_ids": torch.zeros(3, 4), "labels": torch.ones(3, 4)}
    assert d.shard(batch) is batch and d.loss_scale(5, 7.0) == 1.0
    assert Dist(rank=1, world_size=2).shard(batch)["labels"].shape[0] == 1
    assert Dist(rank=0, world_size=2).loss_scale(3, 12.0) == 0.5
    with pytest.raises(Exception, match="--batch-size 2 is smaller than the 3 processes"):
        check_world(2, 3)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    from slmkit.models import save_model
    from tests.conftest import build_tiny_model

    root = tmp_path_factory.mktemp("ddp-model")
    return save_model(build_tiny_model("llama", tokenizer), tokenizer, root / "llama",
                      step="init", params={"arch": "llama"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """JSONL text rows (several documents, so there is a validation split)."""
    import textwrap

    text = Path(textwrap.__file__).read_text()
    path = tmp_path_factory.mktemp("ddp-data") / "docs.jsonl"
    rows = [text[i:i + 400] for i in range(0, 40_000, 400)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"SLMKIT_CACHE_DIR": str(tmp_path_factory.mktemp("ddp-cache")),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


BASE = dict(seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, eval_every=3,
            checkpoint_every=3, log_every=1, precision="fp32")


def _cli(opts: dict, positional: str | None = None) -> list[str]:
    """The CLI spelling of a config's fields (the same options the reference run gets)."""
    args = [positional] if positional else []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return args


def _train_opts(model, data, out, **kw) -> dict:
    return {"model": str(model), "data": str(data), "out": str(out), **BASE,
            "val_fraction": 0.1, "eval_tokens": 256, **kw}


def _torchrun(verb: str, args: list[str], env: dict, nproc: int = 2, timeout: int = 120,
              **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "-m", "slmkit.cli", verb, *args]
    full = {**os.environ, **env}
    if popen:
        return subprocess.Popen(cmd, env=full, **popen)
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)


def _history(out: Path) -> list[dict]:
    return json.loads((out / "train_log.json").read_text())["history"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _assert_same_run(a: Path, b: Path, rel: float = 1e-4, atol: float = 1e-4) -> None:
    """Same steps, tokens and LR; losses within ``rel``; weights within ``atol`` (Adam moves
    a weight whose gradient is float noise by up to lr per step, whatever the noise)."""
    ha, hb = _history(a), _history(b)
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    assert [r["tokens"] for r in ha] == [r["tokens"] for r in hb]
    for ra, rb in zip(ha, hb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=rel), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < atol


# --------------------------------------------------------------------------- train

def test_two_processes_train_what_one_trains(tiny_llama, corpus, env, tmp_path, monkeypatch):
    from slmkit.train.run import run_train

    from slmkit.train.config import TrainConfig

    one = tmp_path / "one"                       # the reference: this process, world size 1
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run_train(TrainConfig(**_train_opts(tiny_llama, corpus, one)))

    runs = tmp_path / "runs"
    runs.mkdir()
    two = runs / "two"
    r = _torchrun("train", _cli(_train_opts(tiny_llama, corpus, two)), env)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(one, two)
    assert [p.name for p in runs.iterdir()] == ["two"]          # one output dir, no leftovers
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == \
        ["step-00000003", "step-00000006"]
    record = json.loads((two / "slmkit.json").read_text())
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["backend"] == "gloo"
    assert json.loads((one / "slmkit.json").read_text())["metrics"]["world_size"] == 1
    val_one = json.loads((one / "train_log.json").read_text())["val_history"]
    val_two = json.loads((two / "train_log.json").read_text())["val_history"]
    assert [v["val_loss"] for v in val_two] == pytest.approx([v["val_loss"] for v in val_one],
                                                              rel=1e-4)
    assert r.stdout.count("written to") == 1                     # rank 0's table only
    assert "2 (gloo, DistributedDataParallel)" in r.stdout


@pytest.mark.slow
def test_resume_of_a_one_process_checkpoint_under_torchrun(tiny_llama, corpus, env, tmp_path,
                                                           monkeypatch):
    """--resume from a checkpoint one process wrote, continued by two processes."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.run import run_train

    one = tmp_path / "one"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run_train(TrainConfig(**_train_opts(tiny_llama, corpus, one)))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / "step-00000003",
                    resumed / "checkpoints" / "step-00000003")
    r = _torchrun("train", _cli(_train_opts(tiny_llama, corpus, resumed, resume=True)), env)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(one, resumed)


def test_killing_one_rank_fails_the_job(tiny_llama, corpus, env, tmp_path):
    out = tmp_path / "killed"
    args = _cli(_train_opts(tiny_llama, corpus, out, max_steps=100_000, checkpoint_every=2,
                            eval_every=100_000))
    proc = _torchrun("train", args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    try:
        # checkpoints rotate (the last 2 are kept), so wait for any, not for a given step
        deadline = time.time() + 90
        while time.time() < deadline and not _checkpoints(out):
            time.sleep(0.05)
        assert _checkpoints(out), "no checkpoint in 90 s"
        rank1 = _rank_pid(proc.pid, 1)
        t0 = time.time()
        os.kill(rank1, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert took < 30, f"the job took {took:.0f} s to fail"
    assert "rank 0 of 2 stopped: another process of this torchrun job failed" in stderr
    assert not (out / "config.json").exists()                   # no output model written
    assert _checkpoints(out)                                    # --resume can continue
    assert (out / "checkpoints" / _checkpoints(out)[-1] / "model.safetensors").is_file()


def _checkpoints(out: Path) -> list[str]:
    """The finished checkpoints, oldest first (one being written is a hidden ``.step-*``)."""
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank (a descendant of ``parent``)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and _descends(int(pid), parent):
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


# --------------------------------------------------------------------------- finetune, distill

@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """Prompt/completion rows of different lengths: the shards hold different token counts."""
    path = tmp_path_factory.mktemp("ddp-sft") / "sft.jsonl"
    rows = [{"prompt": f"Add {i} and {i * 3}.", "completion": " " + str(4 * i) * (1 + i % 4)}
            for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_finetune_under_torchrun_matches_one_process(method, tiny_llama, sft_data, env,
                                                     tmp_path, monkeypatch):
    from slmkit.train.finetune import FinetuneConfig, run_finetune

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    opts = {**BASE, "data": str(sft_data), "method": method, "template": "plain",
            "batch_size": 5, "grad_accum": 2, "lr": 1e-3}
    one, two = tmp_path / "one", tmp_path / "two"
    run_finetune(FinetuneConfig(model=str(tiny_llama), out=str(one), **opts))
    r = _torchrun("finetune", _cli({**opts, "out": str(two)}, positional=str(tiny_llama)), env)
    assert r.returncode == 0, r.stderr[-3000:]
    ha, hb = _history(one), _history(two)
    assert [x["tokens"] for x in ha] == [x["tokens"] for x in hb]
    assert [x["loss"] for x in hb] == pytest.approx([x["loss"] for x in ha], rel=1e-4)
    assert json.loads((two / "slmkit.json").read_text())["metrics"]["world_size"] == 2


@pytest.mark.slow
def test_distill_under_torchrun_matches_one_process(tiny_llama, corpus, env, tmp_path,
                                                    monkeypatch):
    from slmkit.train.distill import DistillConfig, run_distill

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    opts = {**BASE, "data": str(corpus), "teacher": str(tiny_llama),
            "student": str(tiny_llama), "val_fraction": 0.1, "eval_tokens": 256,
            "topk_cache": 8}
    one, two = tmp_path / "one", tmp_path / "two"
    run_distill(DistillConfig(out=str(one), **opts))
    r = _torchrun("distill", _cli({**opts, "out": str(two)}), env)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(one, two)


# --------------------------------------------------------------------------- FSDP

def test_fsdp_is_refused_where_it_cannot_apply(tiny_llama, corpus, tmp_path):
    from slmkit.errors import ConfigError, validated
    from slmkit.train.config import TrainConfig
    from slmkit.train.distill import DistillConfig
    from slmkit.train.finetune import FinetuneConfig
    from slmkit.train.run import run_train

    with pytest.raises(Exception, match="applies to --method full"):
        validated(FinetuneConfig, model="m", data="d.jsonl", max_steps=1, distributed="fsdp")
    with pytest.raises(Exception, match="not supported by distill"):
        validated(DistillConfig, teacher="t", student="s", max_steps=1, distributed="fsdp")
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N"):
        run_train(TrainConfig(**_train_opts(tiny_llama, corpus, tmp_path / "x",
                                            distributed="fsdp")))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_fsdp_trains_what_one_process_trains(tiny_llama, corpus, env, tmp_path, monkeypatch):
    """Sharded parameters, gradients and AdamW state; the same run, the same files."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.run import run_train

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(TrainConfig(**_train_opts(tiny_llama, corpus, one, grad_accum=2)))
    r = _torchrun("train", _cli(_train_opts(tiny_llama, corpus, two, grad_accum=2,
                                            distributed="fsdp")), env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 (gloo, FSDP)" in r.stdout
    _assert_same_run(one, two, atol=1e-3)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two)               # a plain HF dir again
    # the sharded run's checkpoint is an ordinary one: resume it in one process
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-00000003",
                    resumed / "checkpoints" / "step-00000003")
    run_train(TrainConfig(**_train_opts(tiny_llama, corpus, resumed, grad_accum=2),
                          resume=True))
    _assert_same_run(one, resumed, atol=1e-3)
