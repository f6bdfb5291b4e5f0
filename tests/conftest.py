"""Shared fixtures: a real tiny tokenizer, tiny random models per architecture, the CLI.

No network: the hub is switched off for the whole test session, tokenizers are trained on
the stdlib, models are built from tiny configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models: one thread avoids OpenMP start-up and spin costs (measured up to 25x slower
# with 2 threads on a busy 2-core machine). Tests assert behaviour, never speed.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Tiny configs per architecture (vocab is filled in from the tokenizer).
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    sliding_window=64),
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    num_local_experts=4, num_experts_per_tok=2),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=None),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # Gemma 2 / 3: head_dim 32 != hidden / heads, one KV head, a window of 16 on the first
    # layer (tests generate past it), query_pre_attn_scalar != head_dim, Gemma 2 soft-caps.
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                   max_position_embeddings=256, sliding_window=16, query_pre_attn_scalar=64,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                        max_position_embeddings=256, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25),
    "granite": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.0625, logits_scaling=8.0),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      num_experts=4, num_experts_per_tok=2),
}
ARCHS = list(TINY)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer (vocab 512) trained on a slice of the stdlib."""
    from slmkit.models.tokenizer import stdlib_sample, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = train_tokenizer(stdlib_sample(max_files=20, max_bytes=400_000), vocab_size=512)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from slmkit.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def build_tiny_model(arch: str, tokenizer, seed: int = 0, **overrides):
    """A tiny random causal LM of ``arch`` sized to ``tokenizer``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY[arch], **overrides}
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    if "pad_token_id" not in fields:
        fields["pad_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One saved tiny model dir per architecture in ARCHS (made by slmkit.save_model)."""
    from slmkit.models import save_model

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCHS:
        model = build_tiny_model(arch, tokenizer)
        dirs[arch] = save_model(model, tokenizer, root / arch, step="init",
                                params={"arch": arch})
    return dirs


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``slm`` CLI in a subprocess and capture its output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


def pytest_collection_modifyitems(config, items):
    """Tests on the built-in real model first: they are the longest, and under
    pytest-xdist (`make test`) a long test collected last leaves the other worker idle."""
    items.sort(key=lambda item: (item.get_closest_marker("real") is None,
                                 "quickstart" not in item.nodeid))
