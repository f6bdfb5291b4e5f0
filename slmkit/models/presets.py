"""From-scratch model presets, built from transformers configs (no model code of our own).

Parameter counts below assume an 8192-token vocabulary with tied embeddings:

=========  ======  =======  ==================================================
preset     params  family   technique
=========  ======  =======  ==================================================
nano       ~1.2M   llama    RMSNorm, RoPE, SwiGLU, GQA
micro      ~4.7M   llama    same, wider and deeper
small      ~24M    llama    same
base       ~100M   llama    same
micro-swa  ~4.7M   mistral  sliding-window attention (window 256)
micro-moe  ~9M     mixtral  mixture of experts: 4 experts, 2 active per token
=========  ======  =======  ==================================================
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from slmkit.errors import ConfigError
from slmkit.models.arch import kv_heads
from slmkit.step import StepConfig, StepResult, cli

_LLAMA_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                     attention_bias=False, mlp_bias=False, initializer_range=0.02)

PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(model_type="llama", hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=512,
                 tie_word_embeddings=True, **_LLAMA_COMMON),
    "micro": dict(model_type="llama", hidden_size=192, num_hidden_layers=8,
                  num_attention_heads=6, num_key_value_heads=2, intermediate_size=512,
                  max_position_embeddings=1024, tie_word_embeddings=True, **_LLAMA_COMMON),
    "small": dict(model_type="llama", hidden_size=384, num_hidden_layers=12,
                  num_attention_heads=6, num_key_value_heads=2, intermediate_size=1152,
                  max_position_embeddings=2048, tie_word_embeddings=True, **_LLAMA_COMMON),
    "base": dict(model_type="llama", hidden_size=768, num_hidden_layers=14,
                 num_attention_heads=12, num_key_value_heads=4, intermediate_size=2304,
                 max_position_embeddings=2048, tie_word_embeddings=True, **_LLAMA_COMMON),
    "micro-swa": dict(model_type="mistral", hidden_size=192, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=2, intermediate_size=512,
                      max_position_embeddings=1024, sliding_window=256,
                      tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-5,
                      rope_theta=10000.0, initializer_range=0.02),
    "micro-moe": dict(model_type="mixtral", hidden_size=192, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=2, intermediate_size=384,
                      num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-5,
                      rope_theta=10000.0, initializer_range=0.02, router_aux_loss_coef=0.01),
}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are YAML scalars (``8``, ``true``, ``1e-5``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is not key=value; write e.g. --set "
                              "num_hidden_layers=6.")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def build_config(preset: str, tokenizer=None, overrides: dict[str, Any] | None = None):
    """A transformers config for ``preset``, sized to ``tokenizer``, with overrides applied.

    Raises:
        ConfigError: unknown preset, or an override naming a field the config does not have.
    """
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    fields = dict(PRESETS[preset])
    model_type = fields.pop("model_type")
    if tokenizer is not None:
        fields["vocab_size"] = len(tokenizer)
        for name in ("bos", "eos", "pad"):
            tid = getattr(tokenizer, f"{name}_token_id", None)
            if tid is not None:
                fields[f"{name}_token_id"] = tid
    config = AutoConfig.for_model(model_type, **fields)
    known = set(config.to_dict())
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(f"--set {key}=... names no field of the {model_type} config; "
                              "see the model's config.json for valid field names.")
        old = getattr(config, key)
        number = (int, float) if isinstance(old, float) else type(old)
        if old is not None and not isinstance(old, (dict, list)) and (
                not isinstance(value, number) or isinstance(value, bool) != isinstance(old, bool)):
            raise ConfigError(f"--set {key}={value} is not of type {type(old).__name__} like the "
                              f"preset's {old!r}; pass a value of that type.")
        setattr(config, key, value)
    h, n = config.hidden_size, config.num_attention_heads
    if h % n:
        raise ConfigError(f"hidden_size {h} is not divisible by num_attention_heads {n}; "
                          "change one with --set.")
    kv = kv_heads(config)
    if n % kv:
        raise ConfigError(f"num_attention_heads {n} is not divisible by num_key_value_heads "
                          f"{kv}; change one with --set.")
    return config


def init_model(preset: str, tokenizer=None, overrides: dict[str, Any] | None = None,
               seed: int = 0):
    """A randomly initialised causal LM for ``preset`` (transformers' own init, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(preset, tokenizer, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.slmkit_lineage = []
    return model


def output_vocab_size(model) -> int:
    """Rows of the LM head: ``out_features`` works for nn.Linear and QuantLinear alike
    (a quantized head has packed weights, not ``.weight``)."""
    head = model.get_output_embeddings()
    n = getattr(head, "out_features", None)
    if n is None and getattr(head, "weight", None) is not None:
        n = head.weight.shape[0]
    return int(n or model.config.vocab_size)


def count_params(model) -> dict[str, int]:
    """Total parameters (tied weights once) and active-per-token for mixture-of-experts."""
    seen: set[int] = set()
    total = experts = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name or name.endswith(".experts") or ".experts" in name:
            experts += p.numel()
    config = model.config
    n_exp = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    active = total
    if n_exp and k and experts:
        active = total - experts + experts * k // n_exp
    return {"total": total, "active": active}


# --------------------------------------------------------------------------- the `init` step

class InitConfig(StepConfig):
    """Options of ``slm init`` and of the ``init`` recipe step."""

    preset: Literal[tuple(PRESETS)] = Field(description="The model's shape: "
                                            + ", ".join(PRESETS) + ".",
                                            json_schema_extra=cli(short="-p"))
    tokenizer: str = Field(description="Tokenizer (or model) dir.",
                           json_schema_extra=cli(short="-t"))
    set: dict[str, Any] = Field(default_factory=dict, description="Override a config field: "
                                "key=value (repeatable).")
    seed: int = Field(default=0, description="Random seed for the initial weights.")

    @field_validator("set", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        """``["key=value", ...]`` (the CLI's form) -> ``{key: value}``."""
        if isinstance(v, list):
            try:
                return parse_overrides(v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v


def run_init(cfg: InitConfig) -> StepResult:
    """Create and save a preset model."""
    from slmkit.console import human_bytes, human_count
    from slmkit.models.info import dir_size
    from slmkit.models.io import load_tokenizer, save_model

    cfg.check_output()
    cfg.apply_threads()
    tok = load_tokenizer(cfg.tokenizer)
    model = init_model(cfg.preset, tok, cfg.set, seed=cfg.seed)
    counts = count_params(model)
    final = save_model(model, tok, cfg.out, step="init", params=cfg.lineage(),
                       metrics={"params": counts["total"], "active_params": counts["active"]},
                       overwrite=cfg.overwrite)
    size = dir_size(final)
    rows = [("preset", cfg.preset), ("architecture", type(model).__name__),
            ("parameters", f"{counts['total']:,} ({human_count(counts['total'])})")]
    if counts["active"] != counts["total"]:
        rows.append(("active per token", f"{counts['active']:,} "
                                         f"({human_count(counts['active'])})"))
    rows += [("size on disk", human_bytes(size)), ("written to", str(final))]
    return StepResult("init", str(final), {"params": counts["total"],
                                           "active_params": counts["active"],
                                           "size_on_disk": size}, rows)
