"""QLoRA: LoRA over slmkit's packed 4-bit QuantLinear, on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora_grads_only_in_adapters_and_base_unchanged(tokenizer, arch):
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import make_config
    from slmkit.nn.quant_linear import QuantLinear, set_kernel_mode
    from slmkit.train.lora import QLoRALinear, apply_qlora, merge_qlora
    from slmkit.train.objectives import LMObjective
    from slmkit.train.sft import SFTBatches, SFTExample

    torch.manual_seed(0)
    model = build_tiny_model(arch, tokenizer)
    quantize_model(model, tokenizer, make_config(method="rtn", bits=4, group_size=32))
    apply_qlora(model, rank=4, alpha=8.0)
    wrapped = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert wrapped and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    assert all(b.dtype == torch.uint8 for b in packed.values())

    ex = SFTExample(ids=list(range(10, 40)), n_prompt=10, where="x")
    batch = SFTBatches([ex], 32, 1, pad_id=0).batch(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _ = LMObjective()(model, batch)
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in n), n
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():
        if n.endswith("qweight"):
            assert torch.equal(b, packed[n]), n

    ids = batch["input_ids"]
    set_kernel_mode("dequant")        # compare fp32 maths, not the bf16 int4 kernel's rounding
    try:
        with torch.no_grad():
            want = model.eval()(input_ids=ids).logits
    finally:
        set_kernel_mode("auto")
    with torch.no_grad():
        merge_qlora(model)
        assert not any(isinstance(m, QLoRALinear) for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-3, atol=1e-3)


def test_qlora_needs_quantized_base(tokenizer):
    from slmkit.errors import ConfigError
    from slmkit.train.lora import apply_qlora

    with pytest.raises(ConfigError, match="quantize it first"):
        apply_qlora(build_tiny_model("llama", tokenizer))


def test_finetune_qlora_requantize_cli(llama_dir, tmp_path, cli):
    import json

    from slmkit.models import load_model
    from slmkit.models.lineage import read_record
    from slmkit.nn.quant_linear import QuantLinear

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"x = {i}\n", "completion": f"set x to {i}"})
                            + "\n" for i in range(8)))
    out = tmp_path / "q"
    r = cli("finetune", str(llama_dir), "--data", str(data), "--out", str(out), "--method",
            "qlora", "--requantize", "--max-steps", "3", "--seq-len", "64", "--batch-size", "4",
            "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert "re-quantize cost" in r.stdout
    rec = read_record(out)
    assert rec["params"]["method"] == "qlora" and "requantize_loss_cost" in rec["metrics"]
    model, _ = load_model(out)
    assert any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("targets", [None, ["q_proj"]])
def test_finetune_qlora_merged_is_plain_dense(llama_dir, tmp_path, targets):
    import json

    from transformers import AutoModelForCausalLM

    from slmkit.train.finetune import FinetuneConfig, run_finetune

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"y = {i}\n", "completion": f"set y to {i}"})
                            + "\n" for i in range(4)))
    out = tmp_path / "dense"
    res = run_finetune(FinetuneConfig(model=str(llama_dir), data=str(data), out=str(out),
                                      method="qlora", max_steps=2, seq_len=64, batch_size=2,
                                      precision="fp32", target_modules=targets)).figures
    assert res["steps"] == 2 and 0 < res["trainable_fraction"] < 0.5   # of the dense count
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "slmkit" not in cfg
    # plain transformers loads it, every weight present (layers outside the targets too)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
