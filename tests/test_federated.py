"""Federated LoRA: aggregation math against a slow dense reference, the adapter every party
builds, the client handler on real Flower records, DP accounting, the data split, and the
options ``slm federate`` refuses. The end-to-end runs over real Flower processes are in
test_federated_flower.py."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.errors import DataError
from slmkit.federated.aggregate import compact, exact_update, residual_factors, weighted_mean
from slmkit.federated.config import FederateConfig


def _dense_mean(As, Bs, w, s):
    """Slow reference: ``s · Σ_k w_k B_k A_k`` with the weights normalised, in fp64."""
    total = sum(w)
    out = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float64)
    for k in range(len(As)):
        out += (w[k] / total) * s * (Bs[k].double() @ As[k].double())
    return out


def _clients(K=3, r=4, n_in=24, n_out=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n_in, generator=g) for _ in range(K)]
    Bs = [torch.randn(n_out, r, generator=g) for _ in range(K)]
    return As, Bs


def test_fedavg_of_factors_is_not_the_mean_of_products_but_exact_is():
    As, Bs = _clients()
    w, s = [10.0, 30.0, 60.0], 2.0
    ref = _dense_mean(As, Bs, w, s)
    A_bar, B_bar, (U, V) = exact_update(As, Bs, w, s, None)
    fedavg = s * (B_bar.double() @ A_bar.double())
    exact = fedavg + U.double() @ V.double()
    assert (fedavg - ref).norm() / ref.norm() > 0.1          # FedAvg misses the cross terms
    assert torch.allclose(exact, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.allclose(A_bar, weighted_mean(As, w)) and torch.allclose(B_bar,
                                                                          weighted_mean(Bs, w))


def test_exact_residual_accumulates_over_rounds_and_compacts():
    """Round 2 starts from (Ā, B̄) + residual; the global update after it equals the
    reference chain, and the residual's rank never exceeds min(out, in)."""
    s, w = 0.5, [1.0, 2.0, 3.0]
    As1, Bs1 = _clients(seed=1)
    A1, B1, res = exact_update(As1, Bs1, w, s, None)
    global1 = _dense_mean(As1, Bs1, w, s)
    # clients move on from the new global adapter
    As2 = [A1 + 0.1 * torch.randn_like(A1) for _ in range(3)]
    Bs2 = [B1 + 0.1 * torch.randn_like(B1) for _ in range(3)]
    A2, B2, res2 = exact_update(As2, Bs2, w, s, res)
    ref = global1 - s * (B1.double() @ A1.double()) + _dense_mean(As2, Bs2, w, s)
    got = s * (B2.double() @ A2.double()) + res2[0].double() @ res2[1].double()
    assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()))
    assert res2[0].shape[1] <= 16


def test_compact_keeps_the_product_and_drops_dependent_directions():
    g = torch.Generator().manual_seed(3)
    U0, V0 = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    U, V = torch.cat([U0, 2 * U0], 1), torch.cat([V0, -V0], 0)      # rank 3 as 6 columns
    U2, V2 = compact(U, V)
    assert U2.shape[1] == 3
    assert torch.allclose(U2 @ V2, U @ V, atol=1e-5)
    U3, V3 = residual_factors(*_clients(K=2), [1.0, 1.0])
    assert U3.shape[1] == 3 * 4


def _cfg(model, **kw):
    return FederateConfig(model=str(model), clients=["a"], rank=4, seq_len=64, batch_size=2,
                          local_steps=2, threads=1, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_residual_branch_and_merge_equal_the_dense_update(tiny_model_dirs, arch):
    """attach_residual's forward equals the merged dense model's (GPT-2: Conv1D stores W^T),
    and the stacked peft adapter loads in plain peft with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmkit.federated.adapters import (attach_residual, build_adapted, get_factors,
                                           lora_layers, merge_dense, scalings, set_factors,
                                           stacked_adapter)
    from slmkit.federated.server import _adapter_model

    cfg = _cfg(tiny_model_dirs[arch])
    model, _ = build_adapted(cfg)
    g = torch.Generator().manual_seed(0)
    factors = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in get_factors(model).items()}
    set_factors(model, factors)
    residual = {k: (0.05 * torch.randn(mod.lora_B["default"].weight.shape[0], 3, generator=g),
                    0.05 * torch.randn(3, mod.lora_A["default"].weight.shape[1], generator=g))
                for k, mod in list(lora_layers(model).items())[:3]}
    x = torch.randint(0, 100, (1, 12))
    hooks = attach_residual(model, residual)
    with torch.no_grad():
        wrapped = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    adapter = _adapter_model(cfg, model, factors, residual)
    stacked, R = stacked_adapter(factors, scalings(model), residual)
    assert R == cfg.rank + 3
    merged = merge_dense(model, cfg, residual)
    with torch.no_grad():
        dense = merged(input_ids=x).logits
        via_adapter = adapter(input_ids=x).logits
    assert torch.allclose(wrapped, dense, atol=1e-4)
    assert torch.allclose(wrapped, via_adapter, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        adapter.save_pretrained(d)
        plain = PeftModel.from_pretrained(base, d).eval()
        with torch.no_grad():
            assert torch.allclose(plain(input_ids=x).logits, wrapped, atol=1e-4)


@pytest.fixture
def flower_task():
    """The process identity Flower's runtime sets before a ClientApp runs."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _message(arrays, rnd=1, residual=None, node=1):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "config": ConfigRecord({"server-round": rnd})})
    if residual:
        content["residual"] = ArrayRecord(residual)
    return Message(content, dst_node_id=node, message_type="train")


def _context(cfg, node_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={"config": cfg.model_dump_json(exclude_unset=True),
                               "launch": "t"})


def test_client_handler_trains_only_the_adapter_and_refuses_bad_data(llama_dir, tmp_path,
                                                                    flower_task):
    """The real ClientApp handler on real Flower records: an update of the adapter's keys
    and sizes, computed in the one loop; an empty data file is refused in one sentence."""
    from slmkit.federated.adapters import build_adapted, factor_bytes, get_factors
    from slmkit.federated.apps import train

    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n"
                            for i in range(6)))
    cfg = _cfg(llama_dir)
    start = get_factors(build_adapted(cfg)[0])
    reply = train(_message(start), _context(cfg, {"data": str(data), "name": "a"}))
    got = reply.content["arrays"].to_torch_state_dict()
    metrics = reply.content["metrics"]
    assert set(got) == set(start) and metrics["num-examples"] == 6
    assert any(not torch.equal(got[k], start[k]) for k in got if k.endswith("::B"))
    assert metrics["upload-bytes"] >= factor_bytes(start)
    assert reply.content["arrays"].count_bytes() < factor_bytes(start) * 1.2

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused = train(_message(start), _context(cfg, {"data": str(empty), "name": "e"}))
    why = refused.content["client"]["refused"]
    assert "empty.jsonl" in why and "arrays" not in refused.content
    none = train(_message(start), _context(cfg, {"name": "n"}))
    assert "--node-config" in none.content["client"]["refused"]


def test_dp_noise_for_a_budget_spends_that_budget():
    from slmkit.federated.server import dp_epsilon, dp_noise_for

    cfg = FederateConfig(model="m", clients=["a"], rounds=5, dp_clip=1.0, dp_epsilon=8.0)
    z = dp_noise_for(cfg)
    assert 0.3 < z < 3
    assert dp_epsilon(z, 5, 1e-5) == pytest.approx(8.0, abs=0.1)
    assert dp_epsilon(z, 2, 1e-5) < dp_epsilon(z, 5, 1e-5)
    assert dp_epsilon(2 * z, 5, 1e-5) < 8.0


def test_split_by_package_is_non_iid_and_balanced():
    from slmkit.federated.split import package_of, split_by_package

    rows = [{"source": f"stdlib:{p}/m{i}.py"} for p, n in (("email", 9), ("json", 5),
                                                            ("http", 4), ("ast", 1))
            for i in range(n)] + [{"source": "stdlib:abc.py"}] * 2
    parts = split_by_package(rows, 3)
    pkgs = [{package_of(r["source"]) for r in p} for p in parts]
    assert all(not (pkgs[i] & pkgs[j]) for i in range(3) for j in range(i + 1, 3))
    assert sorted(len(p) for p in parts) == [6, 6, 9]


@pytest.mark.parametrize("kwargs,says", [
    ({}, "either --clients"),
    ({"clients": ["a"], "superlink": "127.0.0.1:9091"}, "not both"),
    ({"superlink": "localhost"}, "HOST:PORT"),
    ({"clients": ["a"], "dp_noise": 1.0}, "--dp-noise does not apply"),
    ({"clients": ["a"], "dp_clip": 1.0}, "exactly one of --dp-noise"),
    ({"clients": ["a"], "dp_clip": 1.0, "dp_noise": 1.0, "aggregation": "exact"},
     "--aggregation fedavg"),
    ({"clients": ["a", "b"], "min_clients": 3}, "--min-clients 3"),
])
def test_config_refuses_what_it_cannot_honour(kwargs, says):
    from slmkit.errors import ConfigError, validated

    with pytest.raises(ConfigError, match=says.replace("-", r"\-")):
        validated(FederateConfig, model="m", **kwargs)


def test_cli_refuses_a_client_with_unreadable_data_before_starting(llama_dir, tmp_path, cli):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe not utf-8\n")
    out = tmp_path / "out"
    r = cli("federate", llama_dir, "--clients", f"{good},{bad}", "--out", out)
    assert r.returncode == 2 and "client 'bad'" in r.stderr and "UTF-8" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_load_examples_names_the_file(llama_dir, tmp_path):
    from slmkit.federated.local import load_examples
    from slmkit.models import load_tokenizer

    with pytest.raises(DataError, match="missing.jsonl"):
        load_examples(_cfg(llama_dir), str(tmp_path / "missing.jsonl"),
                      load_tokenizer(llama_dir))


def test_qlora_adapter_residual_and_merge(llama_dir):
    """QLoRA parties: the adapter over the 4-bit base travels the same way, and the merged
    dense model (dequantized base + update + residual) computes what the wrapped one does."""
    from slmkit.federated.adapters import (attach_residual, build_adapted, get_factors,
                                           lora_layers, merge_dense, set_factors)

    cfg = _cfg(llama_dir, method="qlora")
    model, _ = build_adapted(cfg)
    start = get_factors(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert start and trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(1)
    set_factors(model, {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()})
    key, mod = next(iter(lora_layers(model).items()))
    residual = {key: (0.05 * torch.randn(mod.base_layer.out_features, 2, generator=g),
                      0.05 * torch.randn(2, mod.base_layer.in_features, generator=g))}
    x = torch.randint(0, 100, (1, 9))
    attach_residual(model, residual)
    from slmkit.nn.quant_linear import set_kernel_mode

    set_kernel_mode("dequant")                 # the int4 kernel's own rounding aside
    try:
        with torch.no_grad():
            wrapped = model(input_ids=x).logits
    finally:
        set_kernel_mode("auto")
    with torch.no_grad():
        merged = merge_dense(model, cfg, residual)
        assert not any(type(m).__name__ in ("QuantLinear", "QLoRALinear")
                       for m in merged.modules())
        assert torch.allclose(merged(input_ids=x).logits, wrapped, atol=1e-4)


def test_checkpoints_keep_the_last_two_rounds_and_resume_from_the_latest(tmp_path):
    from slmkit.federated.server import _Checkpoints

    ck = _Checkpoints(tmp_path)
    f = {"l::A": torch.ones(2, 3), "l::B": torch.zeros(4, 2)}
    for rnd in (1, 2, 3):
        ck.save(rnd, {k: v * rnd for k, v in f.items()},
                {"l": (torch.ones(4, rnd), torch.ones(rnd, 3))}, [{"round": i} for i in
                                                                 range(1, rnd + 1)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["round-0002", "round-0003"]
    rnd, factors, residual, history = ck.latest()
    assert rnd == 3 and torch.equal(factors["l::A"], 3 * torch.ones(2, 3))
    assert residual["l"][0].shape == (4, 3) and len(history) == 3


def test_round_classification_leaves_out_crashed_and_refusing_clients(flower_task):
    """A reply carrying Flower's error (a ClientApp that raised) and a refusal are left out
    of the round, each named with its reason; an update counts."""
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    from slmkit.federated.server import _classify

    sent = [_message({"l::A": torch.zeros(1, 2)}, node=n) for n in (1, 2, 3)]
    ok = Message(RecordDict({"arrays": ArrayRecord({"l::A": torch.ones(1, 2)}),
                             "metrics": MetricRecord({"num-examples": 3}),
                             "client": ConfigRecord({"name": "a"})}), reply_to=sent[0])
    refused = Message(RecordDict({"client": ConfigRecord({"name": "b", "refused": "b.jsonl "
                                                          "holds no rows"})}), reply_to=sent[1])
    crashed = Message(Error(code=0, reason="<class 'RuntimeError'>:<'boom'>"), reply_to=sent[2])
    valid, left_out = _classify([ok, refused, crashed], {3: "c"})
    assert valid == [ok]
    assert left_out["b"] == "refused: b.jsonl holds no rows"
    assert left_out["c"].startswith("failed") and "boom" in left_out["c"]
