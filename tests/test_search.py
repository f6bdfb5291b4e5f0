"""slm search: per-layer sensitivities, the solve (checked against brute force), the budgets
re-measured on the written model dir, refusals, and the mixed-precision format."""

from __future__ import annotations

import itertools
import json
import random
import shlex

import pytest
import torch

from slmkit.search.config import SearchConfig
from slmkit.search.solve import brute_force, solve_knapsack

FAST = ["--calib-samples", "8", "--calib-seq-len", "64", "--kl-samples", "4",
        "--kl-seq-len", "64", "--threads", "1"]


def _cfg(tmp_path, **kw):
    base = dict(model="x", max_size_mb=1.0, calib_samples=8, calib_seq_len=64, kl_samples=4,
                kl_seq_len=64, cache_dir=str(tmp_path / "cache"))
    return SearchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One sensitivity cache for the CLI runs (the second run reads what the first wrote)."""
    return tmp_path_factory.mktemp("search-cache")


@pytest.fixture(scope="module")
def sens(llama_dir, tmp_path_factory):
    """Exact per-(layer, option) KLs of the tiny Llama."""
    from slmkit.models.io import load_model
    from slmkit.search.sensitivity import measure_sensitivities

    model, tok = load_model(llama_dir, dtype="fp32")
    cfg = _cfg(tmp_path_factory.mktemp("s"), sensitivity="exact")
    layers, path, complete = measure_sensitivities(model, tok, cfg)
    return model, tok, cfg, layers, path, complete


def test_knapsack_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 5)
        costs = [[rng.random() for _ in range(3)] for _ in range(n)]
        weights = [[rng.randint(1, 60) for _ in range(3)] for _ in range(n)]
        budget = rng.randint(1, 180)
        a, b = solve_knapsack(costs, weights, budget), brute_force(costs, weights, budget)
        assert (a is None) == (b is None)
        if a is not None:
            assert sum(weights[i][j] for i, j in enumerate(a)) <= budget
            assert sum(costs[i][j] for i, j in enumerate(a)) == pytest.approx(
                sum(costs[i][j] for i, j in enumerate(b)), abs=1e-12)


def test_two_extra_limits_give_a_feasible_answer_near_the_optimum():
    """Bytes by DP, time and memory by Lagrange multipliers: every answer meets all three,
    and costs no less than the brute-force optimum (a relaxation's answer, feasible)."""
    from slmkit.search.solve import solve_with_limits

    rng = random.Random(1)
    found = 0
    for _ in range(60):
        n = rng.randint(2, 5)
        costs = [[rng.random() for _ in range(3)] for _ in range(n)]
        weights = [[rng.randint(1, 40) for _ in range(3)] for _ in range(n)]
        times = [[rng.random() for _ in range(3)] for _ in range(n)]
        mems = [[rng.randint(1, 40) for _ in range(3)] for _ in range(n)]
        budget, tmax, mmax = rng.randint(20, 120), rng.uniform(0.5, 3), rng.randint(20, 120)
        p = solve_with_limits(costs, weights, budget, [(times, tmax, 0.0), (mems, mmax, 0.0)])
        feasible = [c for c in itertools.product(range(3), repeat=n)
                    if sum(weights[i][j] for i, j in enumerate(c)) <= budget
                    and sum(times[i][j] for i, j in enumerate(c)) <= tmax
                    and sum(mems[i][j] for i, j in enumerate(c)) <= mmax]
        if p is None:
            continue
        found += 1
        assert tuple(p) in feasible
        best = min(sum(costs[i][j] for i, j in enumerate(c)) for c in feasible)
        assert sum(costs[i][j] for i, j in enumerate(p)) >= best - 1e-12
    assert found >= 20


def test_sensitivities_are_measured_and_cached(sens):
    from slmkit.search.sensitivity import measure_sensitivities

    model, tok, cfg, layers, path, complete = sens
    assert complete and path.exists()
    table = layers.pop("model.embed_tokens")       # the embedding table: dense or int8 rows
    assert table.kl["q8"] > 0 and table.bytes["q8"] < table.bytes["dense"] / 3
    assert len(layers) == 14                       # 2 blocks x 7 linears, no lm_head
    for info in layers.values():
        assert info.kl["dense"] == 0.0
        assert set(info.measured) == {o.key for o in info.options if not o.dense}
        assert info.bytes["q3g32"] < info.bytes["q4g32"] < info.bytes["q8"] < info.bytes["dense"]
    # fewer bits, more divergence (q/k of a random tiny model sit at float noise, ~1e-8)
    assert sum(i.kl["q3g32"] for i in layers.values()) > \
        3 * sum(i.kl["q4g32"] for i in layers.values()) > \
        9 * sum(i.kl["q8"] for i in layers.values())
    loud = [i for i in layers.values() if i.kl["q8"] > 1e-7]
    assert loud and all(i.kl["q3g32"] > i.kl["q4g32"] > i.kl["q8"] for i in loud)
    # a second call reads the cache (no model pass: the cache file is not rewritten)
    mtime = path.stat().st_mtime_ns
    again, _, _ = measure_sensitivities(model, tok, cfg)
    assert path.stat().st_mtime_ns == mtime
    assert {n: i.kl for n, i in again.items()} == {**{n: i.kl for n, i in layers.items()},
                                                   table.name: table.kl}


def test_tail_reference_is_the_models_own_distribution(sens):
    from slmkit.compress.calibrate import calibration_batches
    from slmkit.search.sensitivity import Tail

    model, tok, cfg, *_ = sens
    batches = calibration_batches(tok, cfg.calib_data, "train", 4, 32, batch_size=4, seed=5)
    tail = Tail(model, batches)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=batches[0]).logits.float(), -1)
    ref = ref.reshape(-1, ref.shape[-1])                    # [tokens, vocab]
    torch.testing.assert_close(tail.ref[0], ref, atol=1e-4, rtol=1e-4)
    assert tail.kl(0) == pytest.approx(0.0, abs=1e-7)


def test_solve_on_measured_sensitivities_is_optimal_by_enumeration(sens):
    """The tiny space: block 0's seven linears, three options each (3^7 assignments)."""
    *_, layers, _, _ = sens
    names = [n for n in layers if ".layers.0." in n]
    keys = ["q8", "q4g32", "q3g64"]
    costs = [[layers[n].kl[k] for k in keys] for n in names]
    weights = [[layers[n].bytes[k] for k in keys] for n in names]
    lo, hi = sum(min(w) for w in weights), sum(max(w) for w in weights)
    for frac in (0.1, 0.35, 0.6, 0.9):
        budget = int(lo + frac * (hi - lo))
        picks = solve_knapsack(costs, weights, budget)
        best = min((sum(c[j] for c, j in zip(costs, combo)), combo)
                   for combo in itertools.product(range(3), repeat=len(names))
                   if sum(w[j] for w, j in zip(weights, combo)) <= budget)
        assert sum(c[j] for c, j in zip(costs, picks)) == pytest.approx(best[0], rel=1e-12)
        assert sum(w[j] for w, j in zip(weights, picks)) <= budget


def test_search_writes_a_model_within_budget(llama_dir, tmp_path, cli, cache):
    from slmkit.models.info import dir_size, model_info
    from slmkit.models.io import load_model
    from slmkit.nn.quant_linear import QuantLinear

    out = tmp_path / "searched"
    budget_mb = 0.36
    r = cli("search", str(llama_dir), "--max-size-mb", str(budget_mb), *FAST,
            "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pareto front" in r.stdout
    assert dir_size(out) <= budget_mb * 1e6           # re-measured from the written files
    report = json.loads((out / "search" / "search.json").read_text())
    assert (out / "search" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert report["chosen"]["written_bytes"] == dir_size(out)
    assert abs(report["chosen"]["size_bytes"] - dir_size(out)) <= 8192   # exact but the json
    assert len(report["pareto"]) >= 3
    # the additive prediction and the true end-to-end KL agree to a factor of two here
    chosen = report["chosen"]
    assert 0.5 < chosen["true_kl"] / chosen["predicted_kl"] < 2
    info = model_info(out)
    assert info["lineage"][-1]["step"] == "search"
    model, _ = load_model(out)
    for name, key in report["assignment"].items():
        layer = model.get_submodule(name)
        if key == "dense":
            assert not isinstance(layer, QuantLinear)
        else:
            assert isinstance(layer, QuantLinear)
            assert f"q{layer.bits}" + ("" if layer.group_size == -1
                                       else f"g{layer.group_size}") == key
    # a bigger budget never predicts a worse model (the front is monotone)
    kls = [p["predicted_kl"] for p in report["pareto"]]
    assert all(b <= a + 1e-15 for a, b in zip(kls, kls[1:]))
    # a point of the front is written by its one command (sensitivities from the cache)
    point = report["pareto"][len(report["pareto"]) // 2]
    args = shlex.split(point["command"])
    assert args[:3] == ["slm", "search", str(llama_dir)] and args[-1] == "OUT"
    r = cli(*args[1:-1], str(tmp_path / "point"))
    assert r.returncode == 0, r.stdout + r.stderr
    again = json.loads((tmp_path / "point" / "search" / "search.json").read_text())
    assert again["assignment"] == point["assignment"]
    assert dir_size(tmp_path / "point") <= point["max_size_mb"] * 1e6


def test_unmeetable_budgets_are_refused(llama_dir, tmp_path, cli):
    out = tmp_path / "never"
    r = cli("search", str(llama_dir), "--max-size-mb", "0.05", *FAST,
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 2
    assert "cannot be met" in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert not out.exists()
    r = cli("search", str(llama_dir), "--out", str(out))
    assert r.returncode == 2 and "budget" in (r.stderr + r.stdout)


@pytest.mark.slow
def test_speed_budget_predicts_and_remeasures(llama_dir, tmp_path, cli, cache):
    """Slow: the cost model times kernels and decodes two reference models per path."""
    out = tmp_path / "fast"
    r = cli("search", str(llama_dir), "--max-size-mb", "0.4", "--min-decode-tok-s", "5",
            *FAST, "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    chosen = json.loads((out / "search" / "search.json").read_text())["chosen"]
    assert chosen["predicted_decode_tok_s"] >= 5
    assert chosen["measured_decode_tok_s"] > 0
    out = tmp_path / "streams"         # each of 2 concurrent streams at 5 tok/s
    r = cli("search", str(llama_dir), "--max-size-mb", "0.4", "--min-decode-tok-s", "5",
            "--streams", "2", *FAST, "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "search" / "search.json").read_text())
    assert report["chosen"]["predicted_decode_tok_s"] >= 5
    assert report["chosen"]["measured_decode_tok_s"] > 0
    assert any(k.endswith("-s2.json") for k in [p.name for p in cache.iterdir()])
    r = cli("search", str(llama_dir), "--max-size-mb", "0.4", "--min-decode-tok-s", "1e9",
            *FAST, "--cache-dir", str(cache), "--out", str(tmp_path / "no"))
    assert r.returncode == 2 and "cannot be met" in r.stderr + r.stdout


def test_mixed_grids_round_trip(llama_dir, tmp_path, tokenizer):
    """quantize_model with per-layer grids writes layer_grids, and the format loads them."""
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.models import save_model
    from slmkit.models.info import model_info
    from slmkit.models.io import load_model

    model, tok = load_model(llama_dir, dtype="fp32")
    grids = {"model.layers.0.mlp.down_proj": (8, -1), "model.layers.1.self_attn.q_proj": (3, 32)}
    quantize_model(model, tok, QuantizeOptions(bits=4, group_size=64, quantize_embeddings=False),
                   grids=grids)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save_model(model, tok, tmp_path / "mixed", step="quantize")
    loaded, _ = load_model(out)
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").bits == 8
    assert loaded.get_submodule("model.layers.1.self_attn.q_proj").group_size == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before)
    info = model_info(out)
    assert info["params"] == model_info(llama_dir)["params"]


def test_time_limit_still_writes_the_best_so_far(llama_dir, tmp_path, cli):
    """A limit spent before the first block: unmeasured layers borrow placeholder KLs, the
    model is still written within budget and says its sensitivities are incomplete."""
    from slmkit.models.info import dir_size

    out = tmp_path / "early"
    r = cli("search", str(llama_dir), "--max-size-mb", "0.36", "--time-limit", "0.001",
            *FAST, "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped early" in r.stdout
    report = json.loads((out / "search" / "search.json").read_text())
    assert report["sensitivity_complete"] is False
    assert dir_size(out) <= 0.36e6
    # the layers it did not reach are written with RTN: no calibration pass after the limit
    lineage = json.loads((out / "slmkit.json").read_text())
    assert "RTN" in json.dumps(lineage)


def test_rtn_search_refuses_calibration_windows(llama_dir, tmp_path, cli):
    r = cli("search", str(llama_dir), "--max-size-mb", "1", "--method", "rtn",
            "--calib-samples", "8", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--calib-samples" in r.stderr


def test_refinement_scores_candidates_end_to_end(llama_dir, tmp_path, cli, cache):
    """EvoPress-style refinement starts from the additive answer, never ends worse, and the
    written model's true KL is the refined one (the same stored weights)."""
    from slmkit.models.info import dir_size

    out = tmp_path / "refined"
    r = cli("search", str(llama_dir), "--max-size-mb", "0.34", "--refine", "3", *FAST,
            "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    chosen = json.loads((out / "search" / "search.json").read_text())["chosen"]
    ref = chosen["refinement"]
    assert ref["evaluations"] >= 2 and ref["best_kl"] <= ref["start_kl"]
    assert chosen["true_kl"] == pytest.approx(ref["best_kl"], rel=1e-4)
    assert dir_size(out) <= 0.34e6


def test_resident_bytes_count_what_the_kernels_keep():
    """Measured on built layers: int8/int4 keep their codes plus the kernels' packed copies
    (still under a dense fp32 layer), a 3-bit layer keeps a dense copy (over it)."""
    from slmkit.search.memory import resident_bytes
    from slmkit.search.space import Option

    dense = resident_bytes(64, 128, Option(0), native_step=False)
    assert dense == 64 * 128 * 4
    assert resident_bytes(64, 128, Option(4, 32), native_step=False) < dense / 2
    assert resident_bytes(64, 128, Option(8), native_step=False) < dense
    assert resident_bytes(64, 128, Option(3, 32), native_step=False) > dense


@pytest.mark.slow
def test_memory_budget_is_predicted_and_remeasured(llama_dir, tmp_path, cli, cache):
    """Slow: four processes (two searches, two served models). --max-memory-mb at 3 streams: the dense model served in a fresh process fits the
    model's runtime term, the chosen dir is served again and its peak is within the budget
    and close to the prediction; a budget under the runtime alone is refused."""
    out = tmp_path / "mem"
    r = cli("search", str(llama_dir), "--max-memory-mb", "4000", "--streams", "3",
            "--context", "128", *FAST, "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "serving memory" in r.stdout
    report = json.loads((out / "search" / "search.json").read_text())
    chosen, mm = report["chosen"], report["memory_model"]
    assert mm["streams"] == 3 and mm["context"] == 128
    assert chosen["served"]["streams"] == 3
    quantized = any(k != "dense" for k in report["assignment"].values())
    assert chosen["served"]["kv_bytes"] == mm["kv"]["quantized" if quantized else "dense"]
    assert chosen["measured_memory_bytes"] <= 4000e6
    assert abs(chosen["predicted_memory_bytes"] / chosen["measured_memory_bytes"] - 1) < 0.03
    r = cli("search", str(llama_dir), "--max-memory-mb", "50", "--streams", "3",
            "--context", "128", *FAST, "--cache-dir", str(cache), "--out", str(tmp_path / "n"))
    assert r.returncode == 2 and "cannot be met" in r.stdout + r.stderr
    assert "runtime" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_unsupported_combinations_are_refused(tmp_path):
    """One sentence each, from the config (the CLI shows it and exits 2)."""
    from pydantic import ValidationError

    for kw, words in ((dict(streams=2), "--streams"), (dict(context=64), "--context"),
                      (dict(drop_layers=1, min_decode_tok_s=5), "not supported"),
                      (dict(drop_layers=1, refine=2), "not supported")):
        with pytest.raises(ValidationError, match=words):
            _cfg(tmp_path, out=str(tmp_path / "x"), **kw)


def test_dropping_a_block_is_in_the_search_space(llama_dir, tmp_path, cli, cache):
    """Under a budget no per-layer assignment meets, --drop-layers 1 drops the block whose
    KL (measured with it skipped) costs least: the written model has one block fewer, its
    size and KL are what the search predicted, and its layers are the chosen ones."""
    from slmkit.models.info import dir_size
    from slmkit.models.io import load_model
    from slmkit.nn.quant_linear import QuantLinear

    out = tmp_path / "dropped"
    r = cli("search", str(llama_dir), "--max-size-mb", "0.215", "--drop-layers", "1", *FAST,
            "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "search" / "search.json").read_text())
    chosen = report["chosen"]
    assert report["pareto"][0]["size_bytes"] > 0.215e6     # the lightest without a drop
    assert len(chosen["dropped_blocks"]) == 1 and dir_size(out) <= 0.215e6
    assert 0.5 < chosen["true_kl"] / chosen["predicted_kl"] < 2
    gone = chosen["dropped_blocks"][0]
    model, _ = load_model(out)
    assert model.config.num_hidden_layers == len(model.model.layers) == 1
    for name, key in report["assignment"].items():
        if f"layers.{1 - gone}." not in name:
            continue
        layer = model.get_submodule(name.replace(f"layers.{1 - gone}.", "layers.0."))
        assert isinstance(layer, QuantLinear) == (key != "dense")
        if key != "dense":
            assert key.startswith(f"q{layer.bits}")
    r = cli("search", str(llama_dir), "--max-size-mb", "1", "--drop-layers", "2",
            "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no decoder block" in r.stdout + r.stderr
