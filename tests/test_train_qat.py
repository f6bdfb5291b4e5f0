"""QAT: the grid is the packed format's, the packed output computes the trained logits,
gradients pass straight through, and the verbs take --qat."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slmkit.compress.quantize.ops import fake_quantize
from slmkit.nn.packing import compute_qparams
from slmkit.nn.quant_linear import QuantLinear, set_kernel_mode
from slmkit.train.qat import QATLinear, convert, fake_quantize_on_grid, prepare
from tests.conftest import build_tiny_model


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, -1, True)])
def test_grid_is_the_packed_format(bits, group, sym):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    scale, zero = compute_qparams(lin.weight.detach(), bits, group, sym)
    q = QATLinear(lin, scale, zero, bits, group, sym)
    w = q.quantized_weight()
    # slm quantize's RTN of the same weight, and the packed layer's own dequantization
    assert torch.equal(w, fake_quantize(lin.weight.detach(), bits, group, sym))
    assert torch.equal(w, q.to_quant().dequantize_weight())


def test_straight_through_gradient_and_clamp():
    w = torch.tensor([[0.1, -0.2, 0.35, 5.0]], requires_grad=True)
    scale, zero = torch.tensor([[0.1]]), torch.tensor([[8.0]])   # 4-bit sym grid [-0.8, 0.7]
    out = fake_quantize_on_grid(w, scale, zero, 4, -1)
    assert out.detach().tolist()[0] == pytest.approx([0.1, -0.2, 0.4, 0.7])
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]    # identity inside the grid, 0 past it


class _Cfg:
    qat, qat_group_size, qat_sym, qat_start = "int4", 32, True, "rtn"
    qat_calib_data, qat_calib_samples = ["stdlib"], 4


def _train_a_little(model, tokenizer, params):
    """Four AdamW steps on a random batch (the loss must fall); returns the batch and the
    trained model's logits on it, in eval mode."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        return ids, model(ids).logits


def _dequant_logits(model, ids):
    """``model``'s logits on ``ids`` with quantized layers on the dequantizing kernel (the
    exact one), the kernel choice restored after."""
    set_kernel_mode("dequant")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        set_kernel_mode("auto")


def test_trained_logits_equal_packed_logits(tokenizer, tmp_path):
    """A few optimizer steps through the grid, then the packed model (saved, reloaded)
    gives exactly the fake-quantized logits."""
    from slmkit.models import load_model, save_model

    model = build_tiny_model("llama", tokenizer, seed=5)
    info = prepare(model, tokenizer, _Cfg)
    assert info["layers"] == 14 and sum(isinstance(m, QATLinear) for m in model.modules()) == 14
    ids, trained = _train_a_little(model, tokenizer, model.parameters())
    convert(model, info)
    assert model.config.slmkit["format"] == "quant"
    out = save_model(model, tokenizer, tmp_path / "qat", step="train", params={})
    served, _ = load_model(out)
    assert sum(isinstance(m, QuantLinear) for m in served.modules()) == 14
    assert torch.equal(_dequant_logits(served, ids), trained)
    # GGUF export keeps the trained grid: int4 g32 symmetric is Q4_0, block for block
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from slmkit.export import ggml_blocks
    from slmkit.export.gguf_export import export_gguf

    res = export_gguf(str(out), tmp_path / "qat.gguf")
    assert res.quant == "q4_0" and res.from_quantized == 14 and res.requantized == 0
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "qat.gguf").tensors}
    layer = served.get_submodule("model.layers.0.mlp.down_proj")
    back = ggml_blocks.dequantize(np.array(tensors["blk.0.ffn_down.weight"].data), "q4_0",
                                  layer.in_features)
    assert torch.equal(torch.as_tensor(back), layer.dequantize_weight(torch.float32))


def test_gptq_start_is_the_gptq_model(tokenizer):
    """With --qat-start gptq, step 0 computes exactly what slm quantize --method gptq does
    to the linears (QAT trains those; the embedding table stays dense)."""
    from slmkit.compress.quantize import make_config, quantize_model

    model = build_tiny_model("llama", tokenizer, seed=5)
    ref = build_tiny_model("llama", tokenizer, seed=5)
    cfg = type("C", (_Cfg,), {"qat_start": "gptq"})
    prepare(model, tokenizer, cfg)
    quantize_model(ref, tokenizer, make_config(method="gptq", bits=4, group_size=32, sym=True,
                                               calib_data=["stdlib"], calib_samples=4,
                                               quantize_embeddings=False))
    ids = torch.arange(40)[None] + 3
    assert torch.equal(_dequant_logits(model, ids), _dequant_logits(ref, ids))


def test_qat_refuses_lora_and_stray_options():
    from slmkit.train.config import TrainConfig
    from slmkit.train.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="need --qat"):
        TrainConfig(model="nano", max_steps=1, qat_start="gptq")
    with pytest.raises(ValueError, match="--method lora --qat int4"):
        FinetuneConfig(model="x", data="y.jsonl", max_steps=1, qat="int4", method="qlora")
    with pytest.raises(ValueError, match="drop --dropout"):
        FinetuneConfig(model="x", data="y.jsonl", max_steps=1, qat="int4", dropout=0.1)
    FinetuneConfig(model="x", data="y.jsonl", max_steps=1, qat="int4", method="full")
    FinetuneConfig(model="x", data="y.jsonl", max_steps=1, qat="int4", method="lora")


def test_qat_lora_trains_the_adapter_through_the_grid(tokenizer):
    """QAT + LoRA: W stays frozen, A and B learn through the grid, and the packed model
    (W + BA merged on the grid) computes exactly the trained logits."""
    model = build_tiny_model("llama", tokenizer, seed=5)
    info = prepare(model, tokenizer, _Cfg)
    model.requires_grad_(False)
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    for m in layers:
        m.add_lora(4, 8.0)
    frozen = layers[0].weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(layers)
    ids, trained = _train_a_little(model, tokenizer, trainable)
    assert torch.equal(layers[0].weight, frozen) and layers[0].lora_B.abs().sum() > 0
    convert(model, info)
    assert torch.equal(_dequant_logits(model, ids), trained)


@pytest.mark.slow
def test_cli_train_qat_writes_a_packed_model(cli, llama_dir, tmp_path):
    out = tmp_path / "qat"
    res = cli("train", "-m", llama_dir, "--data", "stdlib", "--max-steps", "3", "--seq-len",
              "32", "--batch-size", "2", "--qat", "int4", "--qat-group-size", "32",
              "--eval-tokens", "64", "--out", out, "--precision", "fp32")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "packed vs trained logits" in res.stdout
    assert "QAT val perplexity" in res.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["slmkit"]["format"] == "quant" and cfg["slmkit"]["bits"] == 4
    meta = json.loads((out / "slmkit.json").read_text())
    qat = json.dumps(meta)
    assert '"packed_vs_trained_max_diff": 0.0' in qat
    # KD from the unquantized model: distill the model into its own QAT copy
    kd = cli("distill", "--teacher", llama_dir, "--student", llama_dir, "--data", "stdlib",
             "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--qat", "int8",
             "--val-fraction", "0", "--out", tmp_path / "kd", "--precision", "fp32")
    assert kd.returncode == 0, kd.stderr[-2000:]
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["slmkit"]["bits"] == 8
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    lora = cli("finetune", llama_dir, "--data", rows, "--max-steps", "2", "--qat", "int4",
               "--qat-group-size", "32", "--out", tmp_path / "lora", "--precision", "fp32")
    assert lora.returncode == 0, lora.stderr[-2000:]
    assert json.loads((tmp_path / "lora" / "config.json").read_text())["slmkit"]["bits"] == 4
    meta = json.loads((tmp_path / "lora" / "slmkit.json").read_text())
    assert '"packed_vs_trained_max_diff": 0.0' in json.dumps(meta)
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    bad = cli("finetune", llama_dir, "--data", rows, "--max-steps", "1", "--qat", "int4",
              "--method", "qlora", "--out", tmp_path / "qlora")
    assert bad.returncode == 2 and "--method lora --qat int4" in bad.stdout + bad.stderr


def test_data_free_corpus_is_the_models_own_text(tokenizer, tmp_path):
    from slmkit.train.qat import self_generated_corpus

    model = build_tiny_model("llama", tokenizer, seed=5)
    path = self_generated_corpus(model, tokenizer, 3, 12, seed=1, path=tmp_path / "self.jsonl")
    rows = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    assert len(rows) == 3 and all(rows) and len(set(rows)) == 3
