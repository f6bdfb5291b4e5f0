"""Model load/save with lineage, from-scratch presets, tokenizer training."""

from slmkit.models.io import atomic_dir, load_config, load_model, load_tokenizer, save_model

__all__ = ["atomic_dir", "load_config", "load_model", "load_tokenizer", "save_model"]
