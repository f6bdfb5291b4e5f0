"""Structured pruning: importance math, exact removal of dead units, configs that match."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.prune import structured_ops as sops
from slmkit.compress.prune.structured import StructuredOptions, structured_prune
from slmkit.errors import ConfigError, validated
from tests.conftest import build_tiny_model, run_cli
from tests.test_prune_model import calib_corpus  # noqa: F401  (shared fixture)


def test_head_energy_and_groups_match_a_loop():
    x = torch.randn(10, 4 * 3)  # 4 heads of dim 3
    got = sops.head_energy(x, 4)
    ref = [sum(float(x[t, h * 3:(h + 1) * 3].pow(2).sum()) for t in range(10)) for h in range(4)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64))
    assert sops.group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [3.0, 7.0]


def test_heads_to_keep_by_groups_and_within_groups():
    scores = torch.tensor([5.0, 1.0, 0.5, 0.1, 9.0, 2.0])  # 6 heads, 2 KV groups of 3
    q, kv = sops.heads_to_keep(scores, 2, 3, "groups")  # drop the weaker group (6.5 < 11.1)
    assert q.tolist() == [3, 4, 5] and kv.tolist() == [1]
    q, kv = sops.heads_to_keep(scores, 2, 2, "within")  # one head from each group
    assert q.tolist() == [0, 1, 4, 5] and kv.tolist() == [0, 1]
    assert sops.head_channels(torch.tensor([0, 2]), 2).tolist() == [0, 1, 4, 5]


def test_block_influence_is_zero_for_identity_and_one_for_orthogonal():
    x = torch.randn(5, 8)
    assert sops.block_influence(x, x)[0] == pytest.approx(0.0, abs=1e-9)
    a, b = torch.eye(2), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    assert sops.block_influence(a, b) == (pytest.approx(2.0), 2)


def _settings(corpus, **kw):
    return StructuredOptions(calib_data=corpus, calib_samples=8, calib_seq_len=32, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_dead_units_are_removed_exactly(arch, tokenizer, calib_corpus):  # noqa: F811
    """Zero out one KV group, half the MLP channels and one whole block: pruning exactly
    those leaves the logits unchanged, so the slicing keeps every live weight in place."""
    model = build_tiny_model(arch, tokenizer)
    d = model.config.head_dim if getattr(model.config, "head_dim", None) else 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[d:].zero_()  # KV group 1 outputs nothing
            if layer.self_attn.v_proj.bias is not None:
                layer.self_attn.v_proj.bias[d:].zero_()
            layer.mlp.up_proj.weight[::2].zero_()  # every even MLP channel is dead
        last = model.model.layers[1]
        last.self_attn.o_proj.weight.zero_()  # block 1 becomes the identity
        last.mlp.down_proj.weight.zero_()
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    res = structured_prune(model, tokenizer, _settings(calib_corpus, heads=2, mlp_channels=64,
                                                       drop_layers=1))
    assert res.dropped == [1]
    assert res.after == {"layers": 1, "heads": 2, "kv_heads": 1, "mlp_channels": 64,
                         "hidden": 64}
    with torch.no_grad():
        torch.testing.assert_close(res.model(ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_model_has_a_matching_config_and_loads_in_plain_transformers(
        arch, tokenizer, tmp_path, calib_corpus):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from slmkit.models import save_model

    model = build_tiny_model(arch, tokenizer)
    res = structured_prune(model, tokenizer, _settings(calib_corpus, heads=2, mlp_channels=32,
                                                       hidden=16, drop_layers=1))
    out = save_model(res.model, tokenizer, tmp_path / "small", step="prune")
    plain = AutoModelForCausalLM.from_pretrained(out)
    cfg = plain.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_attention_heads, cfg.num_key_value_heads) == (1, 48, 96, 2, 1)
    layer = plain.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * 16, 48)
    assert layer.self_attn.k_proj.weight.shape == (16, 48)
    assert layer.mlp.down_proj.weight.shape == (48, 96)
    assert plain.model.embed_tokens.weight.shape == (len(tokenizer), 48)
    assert plain.num_parameters() == res.params_after < res.params_before
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, res.model(ids).logits)


def test_target_params_chooses_a_split_under_the_target(tokenizer, calib_corpus):  # noqa: F811
    model = build_tiny_model("mistral", tokenizer, num_hidden_layers=4)
    res = structured_prune(model, tokenizer, _settings(calib_corpus, target_params=0.75))
    assert res.candidates > 1
    assert 0.6 * res.params_before <= res.params_after <= 0.75 * res.params_before
    assert res.model.num_parameters() == res.params_after


@pytest.mark.parametrize("kw,needle", [
    (dict(heads=4), "would prune all 4 attention heads"),
    (dict(heads=1), "does not fit 4 heads in 2 KV groups"),
    (dict(mlp_channels=128), "would remove all 128"),
    (dict(drop_layers=2), "would remove all 2"),
    (dict(target_params=0.75, heads=2), "pass one or the other"),
    (dict(target_params=1.2), "Invalid --target-params"),
    (dict(), "needs --target-params"),
])
def test_impossible_plans_are_refused(kw, needle, tokenizer):
    model = build_tiny_model("llama", tokenizer)
    with pytest.raises(ConfigError) as err:
        structured_prune(model, tokenizer, validated(StructuredOptions, **kw))
    assert needle in str(err.value)


def test_unsupported_architecture_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="not 'gpt2'"):
        structured_prune(build_tiny_model("gpt2", tokenizer), tokenizer,
                         StructuredOptions(heads=1))


@pytest.mark.slow
def test_cli_structured(llama_dir, tmp_path, calib_corpus):  # noqa: F811
    out = tmp_path / "small"
    res = run_cli("prune", llama_dir, "--structured", "--heads", "2", "--mlp-channels", "32",
                  "--out", out, "--calib-data", calib_corpus, "--calib-samples", "8",
                  "--calib-seq-len", "32")
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stdout and "mlp_channels" in res.stdout
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_attention_heads, cfg.intermediate_size) == (2, 96)


@pytest.mark.parametrize("arch", ["qwen3", "granite", "phi3", "gemma2", "gemma3_text"])
def test_family_dead_units_are_removed_exactly(arch, tokenizer, tmp_path,
                                               calib_corpus):  # noqa: F811
    """The other dense families (Qwen3's head norms, Granite's multipliers, Phi-3's fused
    q/k/v and gate/up, Gemma's four norms): zero half the MLP channels, one whole block and,
    where there are two KV groups, one group; pruning exactly those keeps the logits. Gemma's
    single KV group loses query heads within it instead (the pruned model saves, loads in
    plain transformers and runs)."""
    from transformers import AutoModelForCausalLM

    from slmkit.models import save_model

    model = build_tiny_model(arch, tokenizer)
    cfg = model.config
    d, kv, n_inter = arch_head_dim(cfg), cfg.num_key_value_heads, cfg.intermediate_size
    q_width = cfg.num_attention_heads * d
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if hasattr(attn, "qkv_proj"):      # rows q | k | v; gate | up
                if kv > 1:
                    attn.qkv_proj.weight[q_width + kv * d + d:].zero_()
                mlp.gate_up_proj.weight[n_inter::2].zero_()
            else:
                if kv > 1:
                    attn.v_proj.weight[d:].zero_()
                mlp.up_proj.weight[::2].zero_()
        last = model.model.layers[1]
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    heads = 2 if kv > 1 else 0
    res = structured_prune(model, tokenizer, _settings(calib_corpus, heads=heads or None,
                                                       mlp_channels=n_inter // 2,
                                                       drop_layers=1))
    assert res.dropped == [1] and res.after["mlp_channels"] == n_inter // 2
    assert res.after["heads"] == cfg.num_attention_heads - heads
    with torch.no_grad():
        torch.testing.assert_close(res.model(ids).logits, ref, atol=1e-4, rtol=1e-4)
    if kv == 1:                                  # Gemma: heads within the one KV group
        res = structured_prune(model, tokenizer, _settings(calib_corpus, heads=2))
        assert (res.after["heads"], res.after["kv_heads"]) == (2, 1)
        out = save_model(res.model, tokenizer, tmp_path / "small", step="prune")
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert plain.model.layers[0].self_attn.q_proj.weight.shape == (2 * d, cfg.hidden_size)
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, res.model(ids).logits)
        with pytest.raises(ConfigError, match="sqrt\\(hidden size\\)"):
            structured_prune(model, tokenizer, _settings(calib_corpus, hidden=16))


def test_experts_on_a_dense_model_are_refused(tokenizer):
    with pytest.raises(ConfigError, match="'llama' is not a mixture of experts"):
        structured_prune(build_tiny_model("llama", tokenizer), tokenizer,
                         StructuredOptions(experts=1))


def arch_head_dim(cfg) -> int:
    from slmkit.models.arch import head_dim

    return head_dim(cfg)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_are_removed_as_the_router_would_skip_them(arch, tokenizer, tmp_path,
                                                           calib_corpus):  # noqa: F811
    """--experts drops, per layer, the experts the router gives the least probability on
    the calibration text: the router's rows and the experts' slices go, the rest is kept.
    The pruned model equals the original whose router never picks the dropped experts (their
    logits set to -inf before the softmax: a slow reference router written here), for
    Mixtral's renormalised top-k and Qwen2-MoE's plain one; it saves and loads in plain
    transformers."""
    from transformers import AutoModelForCausalLM

    from slmkit.models import save_model

    model = build_tiny_model(arch, tokenizer, initializer_range=0.2)
    cfg = model.config
    n = cfg.num_local_experts if arch == "mixtral" else cfg.num_experts
    res = structured_prune(model, tokenizer, _settings(calib_corpus, experts=1))
    assert (res.before["experts"], res.after["experts"]) == (n, n - 1)
    assert res.params_after < res.params_before
    ids = torch.randint(0, len(tokenizer), (2, 16))
    dropped = []
    for old, new in zip(model.model.layers, res.model.model.layers):
        kept = [e for e in range(n) if any(torch.equal(old.mlp.gate.weight[e], w)
                                           for w in new.mlp.gate.weight)]
        assert len(kept) == n - 1
        torch.testing.assert_close(new.mlp.experts.down_proj, old.mlp.experts.down_proj[kept])
        dropped.append(next(e for e in range(n) if e not in kept))

    def masked_router(router, gone):
        def forward(x):            # the router's rule, with the dropped expert never chosen
            x = x.reshape(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(x, router.weight)
            logits[:, gone] = float("-inf")
            probs = logits.float().softmax(-1)
            top, idx = torch.topk(probs, router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        return forward

    for layer, gone in zip(model.model.layers, dropped):
        layer.mlp.gate.forward = masked_router(layer.mlp.gate, gone)
    with torch.no_grad():
        torch.testing.assert_close(res.model(ids).logits, model(ids).logits,
                                   atol=1e-4, rtol=1e-4)
    out = save_model(res.model, tokenizer, tmp_path / "small", step="prune")
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, res.model(ids).logits)
    with pytest.raises(ConfigError, match="fewer than the 2 experts each token uses"):
        structured_prune(model, tokenizer, _settings(calib_corpus, experts=n - 1))
    with pytest.raises(ConfigError, match="--mlp-channels and --hidden do not slice"):
        structured_prune(model, tokenizer, _settings(calib_corpus, mlp_channels=16))
