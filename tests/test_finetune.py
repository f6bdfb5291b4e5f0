"""SFT data (chat template, prompt masking, bad rows) and `slm finetune` (LoRA, full, merge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmkit.errors import DataError
from slmkit.train.ops import IGNORE_INDEX

ROWS = [{"prompt": f"def f{i}(x):\n    return x + {i}\n", "completion": f"Add {i} to x."}
        for i in range(12)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def task_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "task.jsonl", ROWS)


# --------------------------------------------------------------------------- data


def test_prompt_tokens_are_masked(tokenizer, tmp_path):
    from slmkit.train.sft import SFTBatches, load_sft_examples, masked_labels

    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "What is 2+2?", "completion": "Four."},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello there."}]}])
    exs = load_sft_examples(str(path), tokenizer, 64)
    for ex in exs:
        inputs, labels = masked_labels(ex)
        trained = [t for t in labels if t != IGNORE_INDEX]
        # exactly the completion tokens (plus the template's end of turn) are targets
        completion_text = tokenizer.decode(trained)
        assert "2+2" not in completion_text and "Hi" not in completion_text
        assert completion_text.startswith(("Four.", "Hello there."))
        assert labels[:ex.n_prompt - 1] == [IGNORE_INDEX] * (ex.n_prompt - 1)
        assert len(trained) == len(ex.ids) - ex.n_prompt
        # the prompt ends with the template's assistant header
        assert tokenizer.decode(ex.ids[:ex.n_prompt]).endswith("<|im_start|>assistant\n")
    b = SFTBatches(exs, 64, 2, pad_id=tokenizer.pad_token_id).batch(0)
    width = max(len(ex.ids) for ex in exs) - 1
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, width)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_plain_template_is_prompt_completion_eos(tokenizer, tmp_path):
    from slmkit.train.sft import load_sft_examples, masked_labels

    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "def f(): pass", "completion": " Nothing."}])
    (ex,) = load_sft_examples(str(path), tokenizer, 64, template="plain")
    assert tokenizer.decode(ex.ids) == "def f(): pass Nothing.<|endoftext|>"
    assert tokenizer.decode([t for t in masked_labels(ex)[1] if t != IGNORE_INDEX]) == \
        " Nothing.<|endoftext|>"


def test_loss_ignores_prompt_tokens(tokenizer):
    """Changing the prompt's targets cannot change the loss: only completion labels count."""
    from slmkit.train.objectives import LMObjective
    from slmkit.train.sft import SFTBatches, SFTExample
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", tokenizer)
    ex = SFTExample(ids=list(range(10, 30)), n_prompt=12, where="x")
    batch = SFTBatches([ex], 32, 1, pad_id=0).batch(0)
    loss, _ = LMObjective()(model, batch)
    logits = model(input_ids=batch["input_ids"][:, :19]).logits[0]          # [19, V]
    ref = torch.nn.functional.cross_entropy(logits[11:19], torch.tensor(ex.ids[12:20]))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


def test_packing_keeps_masks(tokenizer, task_file):
    from slmkit.train.sft import SFTBatches, load_sft_examples

    exs = load_sft_examples(str(task_file), tokenizer, 128)
    plain, packed = (SFTBatches(exs, 128, 1, 0, pack=p) for p in (False, True))
    assert len(packed.rows) < len(plain.rows)
    n = lambda src: sum(int((src.batch(i)["labels"] != IGNORE_INDEX).sum())   # noqa: E731
                        for i in range(len(src.rows)))
    assert n(plain) == n(packed)


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p"}, "none of the fields"),
    ({"prompt": "p", "completion": "  "}, "empty completion"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"text": "plain"}, "no 'prompt'+'completion'"),
    ({"prompt": "word " * 200, "completion": "x"}, "longer than the context"),
])
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, row, needle):
    from slmkit.train.sft import load_sft_examples

    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as e:
        load_sft_examples(str(path), tokenizer, 64)
    assert needle in str(e.value) and f"{path} line 2" in str(e.value)


# --------------------------------------------------------------------------- finetune


def _cfg(model_dir, data, out, **kw):
    from slmkit.train.finetune import FinetuneConfig

    base = dict(model=str(model_dir), data=str(data), out=str(out), max_steps=6,
                seq_len=64, batch_size=4, precision="fp32", log_every=1, lr=1e-2)
    return FinetuneConfig(**{**base, **kw})


def test_lora_adapter_loads_in_plain_peft(llama_dir, task_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmkit.models import load_model
    from slmkit.models.lineage import read_record
    from slmkit.train.finetune import run_finetune
    from slmkit.train.lora import apply_lora

    out = tmp_path / "adapter"
    res = run_finetune(_cfg(llama_dir, task_file, out)).figures
    assert 0 < res["trainable_fraction"] < 0.2
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    rec = read_record(out)
    assert rec["step"] == "finetune" and rec["params"]["method"] == "lora"
    assert rec["parent"] == str(llama_dir)

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    plain = PeftModel.from_pretrained(base, out).eval()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == Path(llama_dir).resolve()
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert not torch.allclose(got, base_logits, atol=1e-4)    # the adapter changed something
    # slmkit's own wrapping with the trained adapter weights gives the same logits
    from safetensors.torch import load_file
    ours = apply_lora(load_model(llama_dir, dtype="fp32")[0], rank=8, alpha=16.0)
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(ours, load_file(out / "adapter_model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, got)


def test_merged_equals_wrapped(llama_dir, task_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from slmkit.models import load_model
    from slmkit.train.lora import apply_lora, merge_lora

    model, _ = load_model(llama_dir, dtype="fp32")
    wrapped = apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)                        # nonzero update
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = wrapped.eval()(input_ids=ids).logits
        merged = merge_lora(wrapped)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)

    out = tmp_path / "merged"
    from slmkit.train.finetune import run_finetune
    run_finetune(_cfg(llama_dir, task_file, out, merge=True, max_steps=2))
    dense = AutoModelForCausalLM.from_pretrained(out)          # plain transformers loads it
    assert not any("lora" in k for k in dense.state_dict())


def test_full_finetune_and_resume(llama_dir, task_file, tmp_path):
    from slmkit.models.lineage import read_record
    from slmkit.train.finetune import run_finetune

    out = tmp_path / "full"
    first = run_finetune(_cfg(llama_dir, task_file, out, method="full", max_steps=3,
                              checkpoint_every=3)).figures
    assert first["trainable_fraction"] == 1.0 and first["steps"] == 3
    # continue the same run to 5 steps from its last checkpoint
    res = run_finetune(_cfg(llama_dir, task_file, out, method="full", max_steps=5,
                            checkpoint_every=5, resume=True)).figures
    assert res["steps"] == 5
    assert read_record(out)["metrics"]["steps"] == 5


def test_cli_finetune_and_bad_input(llama_dir, task_file, tmp_path, cli):
    out = tmp_path / "cli-out"
    r = cli("finetune", str(llama_dir), "--data", str(task_file), "--out", str(out),
            "--max-steps", "2", "--seq-len", "64", "--batch-size", "2", "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stdout and (out / "adapter_config.json").exists()

    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "p", "completion": ""}])
    r = cli("finetune", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "x"),
            "--max-steps", "2")
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- built-in task data


def test_builtin_task_rows_come_from_the_train_split(tokenizer):
    from slmkit.data.split import in_split
    from slmkit.train.sft import load_sft_examples
    from slmkit.train.task_data import builtin_task_rows, default_template

    rows = builtin_task_rows("stdlib-docstring", max_samples=5)
    assert len(rows) == 5                       # every item from a TRAIN document: no leakage
    assert all(in_split(r["source"], "train", 0.05) and not in_split(r["source"], "val", 0.05)
               for r in rows)
    assert all(r["completion"].endswith('"""') and r["prompt"].endswith('.__doc__ = """')
               for r in rows)
    assert default_template("stdlib-docstring") == "plain"
    assert default_template("task.jsonl") == "chat"
    exs = load_sft_examples("stdlib-docstring", tokenizer, 4096, "plain", max_samples=3)
    assert len(exs) == 3
    text = tokenizer.decode(exs[0].ids)
    assert text == rows[0]["prompt"] + rows[0]["completion"] + tokenizer.eos_token


def test_cli_finetune_on_builtin_task(llama_dir, tmp_path, cli):
    from slmkit.models.lineage import read_record

    out = tmp_path / "ft-doc"
    r = cli("finetune", str(llama_dir), "--data", "stdlib-docstring", "--max-samples", "6",
            "--out", str(out), "--max-steps", "2", "--seq-len", "256", "--batch-size", "2",
            "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert "plain template" in r.stdout
    rec = read_record(out)
    assert rec["params"]["template"] == "plain" and rec["params"]["max_samples"] == 6
    assert 0 < rec["metrics"]["samples"] <= 6


@pytest.mark.parametrize("method,targets,needle", [
    ("lora", "q_proj,(oops", "'(oops' is not a valid regular"),
    ("qlora", "q_proj,nothing_here", "nothing_here match no")])
def test_cli_bad_target_modules(llama_dir, task_file, tmp_path, cli, method, targets, needle):
    out = tmp_path / "t"
    r = cli("finetune", str(llama_dir), "--data", str(task_file), "--out", str(out),
            "--method", method, "--target-modules", targets, "--max-steps", "1")
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_target_regex_expands_to_module_names(llama_dir):
    from slmkit.models import load_model
    from slmkit.train.lora import apply_lora

    model = apply_lora(load_model(llama_dir, dtype="fp32")[0], rank=2,
                       target_modules=["(q|v)_proj"])
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
               if "lora_A" in n}
    assert wrapped == {"q_proj", "v_proj"}
