"""Compact N:M storage (``slm prune --pattern N:M --compact``): exact round trips, size, info."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit.compress.prune import nm_format
from slmkit.compress.prune.api import PruneConfig, run_prune
from slmkit.errors import ConfigError, ModelLoadError, validated
from slmkit.models import load_model
from slmkit.models.info import model_info
from tests.conftest import run_cli


def _nm_sparse(rows: int, k: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    groups = w.view(rows, k // m, m)
    drop = torch.rand(rows, k // m, m, generator=g).argsort(-1)[..., n:]
    groups.scatter_(2, drop, 0.0)
    return w


@pytest.mark.parametrize("n,m,k", [(2, 4, 12), (4, 8, 16), (1, 4, 20), (2, 4, 64)])
def test_pack_round_trip_is_exact(n, m, k):
    w = _nm_sparse(5, k, n, m)
    w[0, :m] = 0                      # a group with fewer non-zeros than n
    w[1, m:2 * m] = 0
    w[1, m] = 3.0
    values, mask = nm_format.pack(w, n, m)
    assert values.shape == (5, k * n // m) and mask.dtype == torch.uint8
    assert mask.shape == (5, -(-k // 8))
    assert torch.equal(nm_format.unpack(values, mask, (5, k)), w)
    assert nm_format.pack(torch.randn(3, k), n, m) is None          # not N:M
    assert nm_format.pack(torch.zeros(3, k + 1), n, m) is None      # m does not divide


def test_mask_bits_are_little_end_first():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [0, 8, 9]] = True
    assert nm_format.pack_bits(mask).tolist() == [[1, 3]]
    assert torch.equal(nm_format.unpack_bits(nm_format.pack_bits(mask), 10), mask)


def _prune(model_dir, out, **kw):
    return run_prune(PruneConfig(model=str(model_dir), out=str(out), method="magnitude",
                                 pattern="2:4", **kw)).figures


def test_compact_model_is_smaller_and_loads_to_the_same_weights(llama_dir, tmp_path):
    dense_res = _prune(llama_dir, tmp_path / "dense")
    res = _prune(llama_dir, tmp_path / "compact", compact=True)
    layers = len(dense_res["layer_sparsity"])
    assert res["compact_layers"] == layers == len(res["layer_sparsity"]) > 0
    a, _ = load_model(tmp_path / "dense")
    b, _ = load_model(tmp_path / "compact")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert getattr(b.config, "slmkit", None) is None    # an ordinary dense model in memory
    ids = torch.arange(3, 20)[None]
    assert torch.equal(a(ids).logits, b(ids).logits)
    # the linears' bytes: half the values plus one bit per weight
    assert res["size_on_disk"] < dense_res["size_on_disk"]
    info, dense_info = model_info(tmp_path / "compact"), model_info(tmp_path / "dense")
    assert info["format"] == "nm_sparse" and info["compression"]["pattern"] == "2:4"
    assert info["params"] == dense_info["params"]
    assert info["sparsity"] == pytest.approx(dense_info["sparsity"])
    saved = sum(v[0] * v[1] for v in info["compression"]["layers"].values())
    assert dense_info["weight_bytes"] - info["weight_bytes"] == saved * 4 - saved * 2 - \
        sum(v[0] * -(-v[1] // 8) for v in info["compression"]["layers"].values())


def test_compact_model_quantizes_and_stays_sparse(llama_dir, tmp_path):
    from slmkit.compress.match import match_linears
    from slmkit.compress.quantize.api import dequantize_model, quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions

    _prune(llama_dir, tmp_path / "compact", compact=True)
    model, tok = load_model(tmp_path / "compact")
    zeros = {n: m.weight == 0 for n, m in match_linears(model).items()}
    quantize_model(model, tok, QuantizeOptions(method="rtn", bits=4, group_size=32))
    dense = match_linears(dequantize_model(model))
    assert sum(int((dense[n].weight[z] != 0).sum()) for n, z in zeros.items()) == 0


def test_compact_needs_a_pattern_and_no_structured(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="add --pattern"):
        validated(PruneConfig, model=str(llama_dir), out=str(tmp_path / "x"), compact=True)
    with pytest.raises(ConfigError, match="drop one of them"):
        validated(PruneConfig, model=str(llama_dir), out=str(tmp_path / "x"), compact=True,
                  structured=True, target_params=0.75)
    assert not (tmp_path / "x").exists()


def test_damaged_compact_file_is_a_clear_load_error(llama_dir, tmp_path):
    out = tmp_path / "compact"
    _prune(llama_dir, out, compact=True)
    f = next(out.glob("*.safetensors"))
    state = load_file(str(f))
    victim = next(k for k in state if k.endswith(nm_format.MASK))
    del state[victim]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="damaged compact weights"):
        load_model(out)


def test_cli_compact_prune_and_info(llama_dir, tmp_path):
    out = tmp_path / "c"
    res = run_cli("prune", llama_dir, "--method", "magnitude", "--pattern", "2:4", "--compact",
                  "--out", out)
    assert res.returncode == 0, res.stderr
    assert "compact storage" in res.stdout
    info = run_cli("info", out)
    assert info.returncode == 0, info.stderr
    assert "nm_sparse" in info.stdout
    bad = run_cli("prune", llama_dir, "--method", "magnitude", "--compact", "--out",
                  tmp_path / "bad")
    assert bad.returncode == 2 and "--pattern" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixture_experts_are_pruned_and_the_compact_model_loads(kind, tiny_model_dirs,
                                                                tmp_path):
    """A mixture's experts are pruned like its other linears (split one per expert, fused
    back as 2:4-sparse 3-D tensors), and its compact dir, whose experts stay in the fused
    layout, loads through the family's own checkpoint layout to the same weights."""
    src = tiny_model_dirs[kind]
    dense_res = _prune(src, tmp_path / "dense")
    res = _prune(src, tmp_path / "compact", compact=True)
    experts = [n for n in res["layer_sparsity"] if ".experts." in n]
    assert experts and all(res["layer_sparsity"][n] == 0.5 for n in experts)
    assert res["compact_layers"] == len(res["layer_sparsity"]) - len(experts)
    a, _ = load_model(tmp_path / "dense")
    b, _ = load_model(tmp_path / "compact")
    fused = a.model.layers[0].mlp.experts.gate_up_proj
    assert fused.dim() == 3 and float((fused == 0).float().mean()) == 0.5
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert dense_res["layer_sparsity"] == res["layer_sparsity"]
