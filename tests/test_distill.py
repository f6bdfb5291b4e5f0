"""Distillation objective and `slm distill`: teacher frozen, cache == live, resume, errors."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmkit.errors import ConfigError, ModelLoadError, validated
from slmkit.train.config import KDOptions
from slmkit.train.objectives_kd import IndexedBatches, KDObjective, TopKCache
from tests.conftest import build_tiny_model, run_cli

STDLIB_FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py",
                "shlex.py", "fnmatch.py", "glob.py", "bisect.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few stdlib modules, one document each (a small corpus tokenizes in a second)."""
    d = tmp_path_factory.mktemp("kd") / "corpus"
    d.mkdir()
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        shutil.copy(root / rel, d / rel.replace("/", "_"))
    return d


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kd-cache"))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    from slmkit.models import save_model

    model = build_tiny_model("llama", tokenizer, seed=1, hidden_size=32, intermediate_size=64)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("kd") / "student", step="init")


def _cfg(teacher, student, data, out, **kw):
    from slmkit.train.distill import DistillConfig

    base = dict(teacher=str(teacher), student=str(student), data=str(data), out=str(out),
                max_steps=4, seq_len=32, batch_size=4, warmup_steps=1, eval_every=2,
                checkpoint_every=2, val_fraction=0.25, eval_tokens=256, precision="fp32",
                topk_cache=None)
    return DistillConfig(**{**base, **kw})


# --------------------------------------------------------------------------- objective


def _batch(tokenizer, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(0, len(tokenizer), (B, T + 1), generator=g)
    return {"input_ids": block[:, :-1], "labels": block[:, 1:]}


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_objective_trains_student_only_and_is_zero_on_itself(tokenizer, loss):
    teacher = build_tiny_model("llama", tokenizer, seed=0)
    student = build_tiny_model("llama", tokenizer, seed=1).train()
    obj = KDObjective(teacher, KDOptions(loss=loss, alpha=0.0, chunk_size=7), len(tokenizer))
    value, metrics = obj(student, _batch(tokenizer))
    value.backward()
    assert value > 1e-3 and set(metrics) == {"loss", "lm_loss", "kd_loss"}
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)

    twin = build_tiny_model("llama", tokenizer, seed=0).train()   # same weights as teacher
    self_value, _ = KDObjective(teacher, KDOptions(loss=loss, alpha=0.0),
                                len(tokenizer))(twin, _batch(tokenizer))
    assert abs(float(self_value.detach())) < 1e-5


def test_eval_mode_reports_plain_lm_loss(tokenizer):
    from slmkit.train.objectives import LMObjective

    teacher = build_tiny_model("llama", tokenizer, seed=0)
    student = build_tiny_model("llama", tokenizer, seed=1).eval()
    batch = _batch(tokenizer)
    kd, metrics = KDObjective(teacher, KDOptions(), len(tokenizer))(student, batch)
    lm, _ = LMObjective()(student, batch)
    torch.testing.assert_close(kd, lm, rtol=1e-5, atol=1e-5)
    assert set(metrics) == {"loss"}


def test_padded_vocabulary_is_shared(tokenizer):
    from slmkit.train.distill import shared_vocab

    teacher = build_tiny_model("llama", tokenizer, seed=0)
    student = build_tiny_model("qwen2", tokenizer, seed=1, vocab_size=len(tokenizer) + 64)
    student.train()
    vocab = shared_vocab(student, teacher, tokenizer)
    assert vocab == len(tokenizer)
    value, _ = KDObjective(teacher, KDOptions(alpha=0.0), vocab)(student, _batch(tokenizer))
    value.backward()
    assert torch.isfinite(value) and value > 0


def test_topk_cache_equals_live_teacher(tokenizer, tmp_path):
    import numpy as np

    from slmkit.train.batches import PackedBatches

    teacher = build_tiny_model("llama", tokenizer, seed=0)
    student = build_tiny_model("llama", tokenizer, seed=1).train()
    tokens = np.random.default_rng(0).integers(0, len(tokenizer), 400).astype(np.uint16)
    batches = IndexedBatches(PackedBatches(tokens, 16, 3, seed=0))
    settings = KDOptions(alpha=0.0, topk_cache=8, chunk_size=10)
    cache = TopKCache(tmp_path / "c", batches.inner.n_chunks, 16, 8, {"t": 1})
    cached = KDObjective(teacher, settings, len(tokenizer), cache)
    live = KDObjective(teacher, settings, len(tokenizer))
    batch = batches.batch(2)
    first, _ = cached(student, batch)           # miss: runs the teacher, fills the cache
    assert cache.misses == 1 and cache.hits == 0
    second, _ = cached(student, batch)          # hit: no teacher
    reopened = TopKCache(tmp_path / "c", batches.inner.n_chunks, 16, 8, {"t": 1})
    third, _ = KDObjective(teacher, settings, len(tokenizer), reopened)(student, batch)
    reference, _ = live(student, batch)
    assert cache.hits == 1 and reopened.hits == 1
    values = [float(v.detach()) for v in (first, second, third, reference)]
    assert values[0] == values[1] == values[2] == values[3]
    assert TopKCache(tmp_path / "c", batches.inner.n_chunks, 16, 8, {"t": 2}).coverage == 0


def test_on_policy_batches_sample_from_the_student(tokenizer):
    teacher = build_tiny_model("llama", tokenizer, seed=0)
    student = build_tiny_model("llama", tokenizer, seed=1).train()
    obj = KDObjective(teacher, KDOptions(on_policy_fraction=1.0), len(tokenizer))
    value, metrics = obj(student, _batch(tokenizer, T=12))
    value.backward()
    assert obj.on_policy_batches == 1 and torch.isfinite(value)


# --------------------------------------------------------------------------- end to end


def test_resume_mid_distillation_matches_uninterrupted_run(llama_dir, student_dir, corpus,
                                                           tmp_path, monkeypatch):
    from slmkit.train import loop
    from slmkit.train.distill import run_distill

    full = run_distill(_cfg(llama_dir, student_dir, corpus, tmp_path / "full",
                                 topk_cache=16))
    assert full.figures["steps"] == 4 and "val_ppl" in full.figures

    real_save = loop.Trainer.save_checkpoint

    def crash_after_step_2(self):
        path = real_save(self)
        if self.state.step == 2:
            raise KeyboardInterrupt          # as if the process were killed here
        return path

    cfg = _cfg(llama_dir, student_dir, corpus, tmp_path / "cut", topk_cache=16)
    monkeypatch.setattr(loop.Trainer, "save_checkpoint", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.setattr(loop.Trainer, "save_checkpoint", real_save)
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert (tmp_path / "cut" / "kd-cache" / "filled.u8").exists()
    resumed = run_distill(cfg.model_copy(update={"resume": True}))
    assert resumed.figures["steps"] == 4
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not (tmp_path / "cut" / "kd-cache").exists()


def test_tokenizer_mismatch_is_refused(llama_dir, corpus, tmp_path):
    from slmkit.models import save_model
    from slmkit.models.tokenizer import stdlib_sample, train_tokenizer
    from slmkit.train.distill import run_distill

    other_tok = train_tokenizer(stdlib_sample(max_files=5, max_bytes=100_000), vocab_size=300)
    other = save_model(build_tiny_model("llama", other_tok), other_tok, tmp_path / "other",
                       step="init")
    with pytest.raises(ConfigError, match="different tokenizer"):
        run_distill(_cfg(llama_dir, other, corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_distills_a_preset_and_refuses_a_teacher_that_does_not_load(
        llama_dir, corpus, tmp_path, tmp_path_factory):
    env = {"SLMKIT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "kd-cache")}
    out = tmp_path / "nano"
    r = run_cli("distill", "--teacher", llama_dir, "--student", "nano", "--data", corpus,
                "--out", out, "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
                "--loss", "jsd", "--precision", "fp32", "--val-fraction", "0.25", env=env)
    assert r.returncode == 0, r.stderr
    assert "slm distill" in r.stdout and "jsd" in r.stdout
    from transformers import AutoModelForCausalLM

    from slmkit.models.lineage import read_lineage
    AutoModelForCausalLM.from_pretrained(out)                  # plain transformers loads it
    assert read_lineage(out)[-1]["step"] == "distill"

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    r = run_cli("distill", "--teacher", broken, "--student", "nano", "--data", corpus,
                "--out", tmp_path / "never", "--max-steps", "1", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: --teacher")
    assert "Traceback" not in r.stderr and not (tmp_path / "never").exists()
    with pytest.raises(ModelLoadError):
        from slmkit.train.distill import load_teacher
        load_teacher(_cfg(tmp_path / "missing", "nano", corpus, tmp_path / "x"))


@pytest.mark.parametrize("bad, flag", [(dict(loss="kl"), "--loss"), (dict(beta=1.0), "--beta"),
                                       (dict(alpha=1.5), "--alpha"),
                                       (dict(max_steps=None), "budget")])
def test_bad_options_are_one_sentence_config_errors(bad, flag):
    from slmkit.train.distill import DistillConfig

    opts = {**dict(teacher="t", student="nano", out="o", max_steps=1), **bad}
    with pytest.raises(ConfigError, match=flag):
        validated(DistillConfig, **opts)
    assert DistillConfig(teacher="t", student="nano", max_steps=1).model == "nano"
