"""Every family of the tiny test set through every verb (issue 25), in-process through the
same ``run(cfg)`` functions the CLI calls; a verb that cannot take a family refuses with
one sentence naming the family. The README's support table is this matrix.

AWQ's folding is checked per family on its own (fast): folding a scale into a producer
(an RMSNorm, Gemma's ``1 + w`` norm, a LayerNorm with bias, a linear) and its inverse into
the consumers must leave the model's function unchanged.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from slmkit.engine import SamplingParams
from slmkit.engine.generate import stream_tokens
from slmkit.errors import ConfigError
from slmkit.models import arch, load_model
from tests.conftest import ARCHS, build_tiny_model

STDLIB_FILES = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fam") / "corpus"
    d.mkdir()
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        shutil.copy(root / rel, d / rel)
    return d


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fam") / "task.jsonl"
    rows = [{"prompt": f"def f{i}(x):\n    return x + {i}\n", "completion": f"Add {i}."}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fam-cache"))


# --------------------------------------------------------------------------- AWQ folding


@pytest.mark.parametrize("kind", [a for a in ARCHS if arch.arch_of(a).awq])
def test_awq_folding_keeps_every_familys_function(kind, tokenizer):
    from slmkit.compress.quantize.awq_mappings import block_mappings, fold_scale
    from slmkit.compress.calibrate import find_blocks
    from slmkit.compress.match import match_linears

    model = build_tiny_model(kind, tokenizer)
    with torch.no_grad():   # trained norms are not all ones: make the fold visible
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randint(3, len(tokenizer), (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    prefix, blocks = find_blocks(model)
    linears = match_linears(model)
    folded = 0
    torch.manual_seed(1)
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}"
        for producer, names in block_mappings(kind, block, name, linears):
            width = linears[names[0]].in_features
            fold_scale(producer, [linears[n] for n in names], torch.rand(width) + 0.5)
            folded += 1
    assert folded >= len(blocks), f"{kind}: nothing to fold"
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=2e-4, rtol=2e-4)


# --------------------------------------------------------------------------- every verb


def _runs(model_dir, n: int = 4) -> list[int]:
    """A loaded model generates greedily on its engine path."""
    model, _ = load_model(model_dir)
    out = list(stream_tokens(model, [5, 17, 42, 99], n))
    assert len(out) == n
    return out


def _calib(corpus) -> dict:
    return dict(calib_data=str(corpus), calib_samples=4, calib_seq_len=32)


def _llamacpp_faithful(model_dir, gguf_arch: str) -> bool:
    """Whether llama.cpp's graph keeps this config's behaviour (the tiny Gemma configs scale
    queries by a scalar other than the head dim on purpose, so GGUF export refuses them)."""
    from transformers import AutoConfig

    from slmkit.export.gguf_meta import check_faithful

    try:
        check_faithful(AutoConfig.from_pretrained(model_dir), gguf_arch, str(model_dir))
    except ConfigError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("kind", ARCHS)
def test_every_verb_on_every_family(kind, tiny_model_dirs, corpus, task_file, tmp_path):
    from slmkit.compress.factorize.api import run_factorize
    from slmkit.compress.factorize.config import FactorizeConfig
    from slmkit.compress.prune.api import run_prune
    from slmkit.compress.prune.config import PruneConfig
    from slmkit.compress.quantize.api import run_quantize
    from slmkit.compress.quantize.config import QuantizeConfig
    from slmkit.eval.evaluate import EvalConfig, run_eval
    from slmkit.export.step import ExportConfig, run_export
    from slmkit.models.info import model_info
    from slmkit.train.config import TrainConfig
    from slmkit.train.distill import DistillConfig, run_distill
    from slmkit.train.finetune import FinetuneConfig, run_finetune
    from slmkit.train.run import run_train

    src = str(tiny_model_dirs[kind])
    facts = arch.arch_of(kind)
    info = model_info(src)
    assert info["model_type"] == kind and info["params"] > 0
    assert (info["active_params"] < info["params"]) == facts.moe
    _runs(src)
    for method, extra in (("rtn", {}), ("gptq", _calib(corpus)),
                          ("awq", {**_calib(corpus), "awq_grid": 4})):
        out = tmp_path / f"q-{method}"
        res = run_quantize(QuantizeConfig(model=src, out=str(out), method=method, bits=4,
                                          group_size=32, **extra))
        assert not any(row[0] == "left dense" for row in res.rows)   # experts too (split)
        _runs(out)
    if facts.moe:   # experts the patterns leave out stay dense, and the output says so
        res = run_quantize(QuantizeConfig(model=src, out=str(tmp_path / "q-ign"), method="rtn",
                                          bits=4, group_size=32, ignore=["experts"]))
        row = dict(res.rows)["left dense"]
        assert "not selected by --targets / --ignore" in row
        _runs(tmp_path / "q-ign")
    for pattern in (None, "2:4"):
        out = tmp_path / f"p-{pattern}"
        run_prune(PruneConfig(model=src, out=str(out), method="wanda", pattern=pattern,
                              sparsity=0.5, **_calib(corpus)))
        _runs(out)
    structured = PruneConfig(model=src, out=str(tmp_path / "ps"), structured=True,
                             **({"experts": 1} if facts.moe else {"mlp_channels": 32}),
                             **_calib(corpus))
    if facts.llama_layout or facts.fast_decode:
        run_prune(structured)
        _runs(tmp_path / "ps")
    else:
        with pytest.raises(ConfigError, match=f"not '{kind}'"):
            run_prune(structured)
    # MoE routers (4 outputs here) have no rank to give: --ignore them, as the refusal says
    routers = [r"mlp\.gate$", r"shared_expert_gate"] if facts.moe else None
    factorize = FactorizeConfig(model=src, out=str(tmp_path / "f"), method="svd", ratio=0.5,
                                ignore=routers)
    if facts.conv1d:
        with pytest.raises(ConfigError, match="Conv1D"):
            run_factorize(factorize)
    else:
        run_factorize(factorize)
        _runs(tmp_path / "f")
    run_finetune(FinetuneConfig(model=src, data=str(task_file), out=str(tmp_path / "lora"),
                                max_steps=2, seq_len=64, batch_size=2, precision="fp32"))
    run_train(TrainConfig(model=src, data=str(corpus), out=str(tmp_path / "t"), max_steps=2,
                          seq_len=32, batch_size=2, warmup_steps=1, eval_every=2,
                          eval_tokens=64, precision="fp32", val_fraction=0.2))
    _runs(tmp_path / "t")
    run_distill(DistillConfig(teacher=src, student=src, data=str(corpus),
                              out=str(tmp_path / "kd"), max_steps=2, seq_len=32, batch_size=2,
                              warmup_steps=1, eval_every=2, eval_tokens=64, precision="fp32",
                              val_fraction=0.2, topk_cache=None))
    res = run_eval(EvalConfig(model=src, data=str(corpus), split="all",
                              tasks=["stdlib-funcname"], task_limit=2, speed=False, seq_len=32,
                              max_tokens=256)).figures
    assert res["ppl"] > 1 and "task_score" in res, res
    onnx = ExportConfig(model=src, format="onnx", out=str(tmp_path / "onnx"))
    if facts.llama_layout or facts.fast_decode:
        run_export(onnx)
    else:
        with pytest.raises(ConfigError, match=kind):
            run_export(onnx)
    gguf = ExportConfig(model=src, format="gguf", out=str(tmp_path / "m.gguf"))
    if facts.gguf_arch and _llamacpp_faithful(src, facts.gguf_arch):
        run_export(gguf)
    else:
        with pytest.raises(ConfigError, match=kind):
            run_export(gguf)
