"""``slm federate`` end to end over real Flower processes on 127.0.0.1.

Deployment: the test starts a SuperLink and three SuperNodes itself (``flower-superlink``,
``flower-supernode``, as separate processes, the way machines of a federation start them),
one of them holding an empty data file, and submits two rounds with ``slm federate
--superlink``. Simulation: ``slm federate --clients`` starts its own federation, here with
DP-FedAvg. Tiny models, two local steps: the tests check behaviour, not quality.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def _task(path, word, n=6):
    path.write_text("".join(json.dumps({"prompt": f"say {word} {i}",
                                        "completion": f" {word} {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_deployment_superlink_three_supernodes_two_rounds(llama_dir, tmp_path, cli):
    """Two rounds of exact aggregation with a client that refuses its (empty) data: the
    rounds go on with the other two, the output is a merged model that plain transformers
    loads plus a peft adapter, and the merged weights are the base plus the exact update.
    A second submission with ``--resume --rounds 3`` continues from round 2's checkpoint."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slmkit.federated.launch import LocalFederation
    from slmkit.federated.server import unpack_residual

    a, b = _task(tmp_path / "a.jsonl", "alpha"), _task(tmp_path / "b.jsonl", "beta")
    empty = tmp_path / "c.jsonl"
    empty.write_text("")
    home = tmp_path / "flwr"
    home.mkdir()
    out = tmp_path / "out"
    with LocalFederation([], home, threads=1, preload=str(llama_dir)) as fed:
        address = f"127.0.0.1:{fed.port}"
        warm = fed.start_warm()
        for name, data in (("a", a), ("b", b), ("c", empty)):
            fed.start_supernode(name, str(data), address, warm)
        args = ["federate", llama_dir, "--superlink", address, "--local-steps", "2",
                "--min-clients", "2", "--aggregation", "exact", "--rank", "4", "--seq-len",
                "64", "--batch-size", "2", "--lr", "0.01", "--round-timeout", "120",
                "--out", out, "--json"]
        r = cli(*args, "--rounds", "2", timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        two = json.loads((out / "slmkit.json").read_text())
        resumed = cli(*args, "--rounds", "3", "--resume", timeout=240)   # a server restart
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    three = json.loads((out / "slmkit.json").read_text())["metrics"]["round_history"]
    assert [h["round"] for h in three] == [1, 2, 3]
    assert three[:2] == two["metrics"]["round_history"]       # rounds 1-2 were not redone
    figures = json.loads(r.stdout)
    record = two
    history = record["metrics"]["round_history"]
    assert record["step"] == "federate" and [h["round"] for h in history] == [1, 2]
    for h in history:
        assert h["clients"] == ["a", "b"]
        assert "c.jsonl" in h["left_out"]["c"] and h["left_out"]["c"].startswith("refused")
    assert history[1]["residual_rank"] > 0
    ck = out / "checkpoints" / "round-0003"
    factors = load_file(ck / "adapter.safetensors")
    # what each client sends is the adapter: its bytes plus Flower's framing of each array
    framing = figures["upload_bytes_per_client_round"] - figures["adapter_bytes"]
    assert figures["adapter_bytes"] == sum(t.numel() * 4 for t in factors.values())
    assert 0 <= framing < 200 * len(factors)

    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    residual = unpack_residual(load_file(ck / "residual.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    s = 16.0 / 4
    U, V = residual[key]
    update = s * factors[f"{key}::B"] @ factors[f"{key}::A"] + U @ V
    delta = merged.get_submodule(key).weight - base.get_submodule(key).weight
    assert update.abs().max() > 0
    assert torch.allclose(delta, update, atol=1e-5)
    x = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(base, out / "adapter")(input_ids=x).logits
        assert torch.allclose(via_peft, merged(input_ids=x).logits, atol=1e-4)


def test_simulation_with_dp_records_the_privacy_spent(llama_dir, tmp_path, cli):
    a, b = _task(tmp_path / "a.jsonl", "alpha"), _task(tmp_path / "b.jsonl", "beta")
    out = tmp_path / "out"
    r = cli("federate", llama_dir, "--clients", f"{a},{b}", "--rounds", "1",
            "--local-steps", "2", "--rank", "4", "--seq-len", "64", "--batch-size", "2",
            "--dp-clip", "0.5", "--dp-noise", "1.0", "--threads", "1", "--out", out,
            timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epsilon" in r.stdout and "SuperNodes on 127.0.0.1" in r.stdout
    metrics = json.loads((out / "slmkit.json").read_text())["metrics"]
    from slmkit.federated.server import dp_epsilon

    assert metrics["dp_epsilon"] == pytest.approx(dp_epsilon(1.0, 1, 1e-5))
    assert metrics["dp_noise_multiplier"] == 1.0 and (out / "adapter").is_dir()
