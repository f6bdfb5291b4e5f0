"""The prompt router: decide before generating whether the small model will do.

RouteLLM (Ong et al. 2024) trains a router on preference data and sends a request to the
strong model when the predicted chance that the weak model's answer is good enough falls
below a threshold. Its routers need an OpenAI key for their embeddings even when both
models are local; ours read the *local model's own hidden states* (or the offline MiniLM
embedder of :mod:`slmkit.rag.embed`), so nothing leaves the machine:

* features ``hidden``: the prompt's last ``max_tokens`` tokens through the local model's
  embeddings and its first ``layers`` decoder layers (the same weights the engine serves;
  a shallow view of the module, nothing is copied), mean-pooled, plus ``log(1 + tokens)``:
  ``float32 [hidden_size + 1]``. ``layers=0`` reads the embedding table only (tens of
  microseconds); each layer costs about 1/L of a prefill;
* features ``minilm``: all-MiniLM-L6-v2's sentence embedding ``[384 + 1]``.

The classifier is an L2-regularised logistic regression over standardised features: tiny,
so a few hundred labelled prompts train it in seconds, and a user trains one for their own
model pair with ``slm route train``. Its score is ``P(the small model suffices)``, so like
a cascade score, a request is forwarded when ``score < threshold``.

Training rows (JSONL): ``prompt`` or ``messages``, and ``label`` (1 = needs the big model)
or ``small_score`` and ``big_score`` (label = ``big_score - small_score > margin``: the
way RouteLLM labels from both models' graded answers).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmkit.errors import ConfigError, DataError
from slmkit.monitor.confidence import fit_logistic

ROUTER_FILE = "router.json"


def prompt_text(body: dict, tokenizer=None) -> str:
    """The prompt of an OpenAI request (or a training row) as plain text: the messages'
    text joined by lines, or the completion prompt (token ids decoded)."""
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p.get("text", "") for p in content if isinstance(p, dict)]
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return tokenizer.decode(prompt) if tokenizer is not None else ""
    if isinstance(prompt, list):
        return "\n".join(str(p) for p in prompt)
    return str(prompt or "")


def _decoder_layers(base) -> tuple[str, object]:
    """The name and ModuleList of a base model's decoder blocks (``layers``, ``h``, ...)."""
    import torch

    n = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", None)
    for name, module in base.named_children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ConfigError(f"Cannot find the decoder layers of {type(base).__name__}; use "
                      "--features minilm for this model.")


class HiddenFeatures:
    """Mean-pooled hidden states of the local model after its first ``layers`` blocks."""

    def __init__(self, model, tokenizer, layers: int, max_tokens: int):
        import torch

        self.tokenizer, self.max_tokens, self.layers = tokenizer, max_tokens, layers
        base = model.base_model
        self.embed = model.get_input_embeddings()
        self.view = None
        if layers > 0:
            name, blocks = _decoder_layers(base)
            if layers > len(blocks):
                raise ConfigError(f"--layers {layers} is more than the model's {len(blocks)} "
                                  "decoder layers; pass at most that.")
            # a shallow copy whose block list is the first `layers` blocks (weights shared)
            self.view = copy.copy(base)
            self.view._modules = dict(base._modules)
            self.view._modules[name] = torch.nn.ModuleList(list(blocks)[:layers])
        hidden = getattr(self.embed, "embedding_dim", None) or model.config.hidden_size
        self.dim = int(hidden) + 1    # (a quantized embedding has no .weight)
        self._torch = torch
        self.encode = _tail_encoder(tokenizer, max_tokens)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """``float32 [len(texts), hidden + 1]``."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i, text in enumerate(texts):
                ids = self.encode(text) or [self.tokenizer.eos_token_id or 0]
                x = torch.tensor([ids])                                     # [1, T]
                if self.view is None:
                    hidden = self.embed(x)                                  # [1, T, H]
                else:
                    hidden = self.view(input_ids=x, use_cache=False).last_hidden_state
                out[i, :-1] = hidden[0].float().mean(0).numpy()
                out[i, -1] = math.log1p(len(ids))
        return out


class MiniLMFeatures:
    """all-MiniLM-L6-v2 sentence embeddings (the RAG embedder) plus the log length."""

    def __init__(self, max_tokens: int):
        from slmkit.rag.embed import Embedder

        self.embedder = Embedder("minilm", batch_size=16)
        self.dim = self.embedder.dim + 1

    def __call__(self, texts: list[str]) -> np.ndarray:
        emb = self.embedder.encode(texts)
        lengths = [math.log1p(len(self.embedder.tokenizer(t)["input_ids"])) for t in texts]
        return np.concatenate([emb, np.array(lengths, dtype=np.float32)[:, None]], axis=1)


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` ranking the ``positive`` rows first (None: one class only)."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return None
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2)
                 / (pos.sum() * (~pos).sum()))


@dataclass
class Router:
    """A trained router (see the module doc); ``score(x) = P(small suffices)``."""

    features: str
    layers: int
    max_tokens: int
    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]
    threshold: float
    source: dict = field(default_factory=dict)

    def featurizer(self, model, tokenizer):
        """The feature function for this router over the served model (checked to fit)."""
        if self.features == "minilm":
            f = MiniLMFeatures(self.max_tokens)
        else:
            f = HiddenFeatures(model, tokenizer, self.layers, self.max_tokens)
        if f.dim != len(self.weights):
            raise ConfigError(f"This router reads {len(self.weights)} features but the model "
                              f"gives {f.dim}: it was trained for another model "
                              f"({self.source.get('model')}); train one for this model with "
                              "`slm route train`.")
        return f

    def decider(self, model, tokenizer):
        """``decide(text) -> score`` for serving: the same score as
        ``score(featurizer(...)([text])[0])``, on the lean path where there is one.

        With token-embedding features (``hidden``, 0 layers) the classifier is linear in the
        mean-pooled embedding, so it folds into one number per vocabulary token at load time
        (``E @ (w / scale)``, :class:`TokenRouter`): a decision is the prompt's tail
        tokenized, a mean of up to ``max_tokens`` floats and one exponential, in the
        caller's thread, with no tensor. Other routers run their features here."""
        if self.features == "hidden" and self.layers == 0:
            return TokenRouter(self, model, tokenizer)
        feats = self.featurizer(model, tokenizer)
        return lambda text: self.score(feats([text])[0])

    def scores(self, x: np.ndarray) -> np.ndarray:
        xs = (np.asarray(x, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        z = np.clip(xs @ np.asarray(self.weights) + self.bias, -60, 60)
        return 1.0 / (1.0 + np.exp(z))     # 1 - sigmoid(z): z is the "needs big" logit

    def score(self, x: np.ndarray) -> float:
        return float(self.scores(x[None])[0])

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ROUTER_FILE
        path.write_text(json.dumps({"kind": "slmkit-router", "features": self.features,
                                    "layers": self.layers, "max_tokens": self.max_tokens,
                                    "weights": self.weights, "bias": self.bias,
                                    "mean": self.mean, "scale": self.scale,
                                    "threshold": self.threshold, "source": self.source},
                                   indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Router:
        path = Path(directory) / ROUTER_FILE
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            assert d.get("kind") == "slmkit-router"
            return cls(d["features"], int(d["layers"]), int(d["max_tokens"]), d["weights"],
                       float(d["bias"]), d["mean"], d["scale"], float(d["threshold"]),
                       d.get("source", {}))
        except (OSError, ValueError, KeyError, AssertionError):
            raise ConfigError(f"{directory} is not a router directory (no readable "
                              f"{ROUTER_FILE}); pass one `slm route train` wrote.") from None


class TokenRouter:
    """A 0-layer hidden-state router folded per vocabulary token (see
    :meth:`Router.decider`): ``z = mean_t proj[id_t] + w_len * log(1 + T) + c``."""

    lean = True    # cheap enough to run on the caller's thread (no hop to a worker)
    CHUNK = 4096   # embedding rows dequantized at a time while folding

    def __init__(self, router: Router, model, tokenizer):
        import torch

        embed = model.get_input_embeddings()
        vocab = getattr(embed, "num_embeddings", None) or embed.weight.shape[0]
        dim = getattr(embed, "embedding_dim", None) or model.config.hidden_size
        if dim + 1 != len(router.weights):
            router.featurizer(model, tokenizer)   # raises the one-sentence mismatch error
        w = np.asarray(router.weights, dtype=np.float64) / np.asarray(router.scale)
        mean = np.asarray(router.mean, dtype=np.float64)
        wt = torch.from_numpy(w[:-1].astype(np.float32))
        proj = np.empty(vocab, dtype=np.float64)
        with torch.inference_mode():   # the served (possibly quantized) rows, chunk by chunk
            for start in range(0, vocab, self.CHUNK):
                ids = torch.arange(start, min(vocab, start + self.CHUNK))
                proj[start:start + len(ids)] = (embed(ids).float() @ wt).double().numpy()
        self.proj = proj.tolist()          # list indexing: no array per request
        self.w_len = float(w[-1])
        self.const = float(router.bias - mean @ w)
        self.max_tokens = router.max_tokens
        self.tokenizer = tokenizer
        self.encode = _tail_encoder(tokenizer, router.max_tokens)
        self.empty = [tokenizer.eos_token_id or 0]

    def __call__(self, text: str) -> float:
        ids = self.encode(text) or self.empty
        proj = self.proj
        z = sum(proj[i] for i in ids) / len(ids) + self.w_len * math.log1p(len(ids)) \
            + self.const
        return 1.0 / (1.0 + math.exp(min(60.0, max(-60.0, z))))


def _tail_encoder(tokenizer, max_tokens: int):
    """``encode(text)``: the last ``max_tokens`` token ids of ``text`` (what
    :class:`HiddenFeatures` pools), tokenizing only the text's tail when it is long.

    A tail of ``16 * max_tokens`` characters holds more than ``max_tokens`` tokens for any
    text but pathological ones; its first token may be a cut word, so it is dropped and
    the whole text is tokenized whenever the tail yields too few tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        def full(text):
            return backend.encode(text, add_special_tokens=False).ids
    else:
        def full(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]
    window = 16 * max_tokens

    def encode(text: str) -> list[int]:
        if len(text) > window:
            ids = full(text[-window:])
            if len(ids) > max_tokens:
                return ids[-max_tokens:]
        return full(text)[-max_tokens:]
    return encode


def read_rows(path: str | Path, margin: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Prompts and labels (1 = needs the big model) from a training JSONL."""
    texts, labels = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read the router data {path} ({e}); pass a UTF-8 JSONL "
                        "file.") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not JSON ({e.msg}); write one object per line.") \
                from None
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise DataError(f"{where} has no 'prompt' or 'messages'; add the request's prompt.")
        if "label" in row:
            if row["label"] not in (0, 1) or isinstance(row["label"], float):
                raise DataError(f"{where} has 'label' {row['label']!r}; use 1 (needs the big "
                                "model) or 0.")
            label = int(row["label"])
        elif isinstance(row.get("small_score"), (int, float)) \
                and isinstance(row.get("big_score"), (int, float)):
            label = int(row["big_score"] - row["small_score"] > margin)
        else:
            raise DataError(f"{where} needs 'label' or numeric 'small_score' and 'big_score'.")
        texts.append(prompt_text(row))
        labels.append(label)
    if len(texts) < 8 or len(set(labels)) < 2:
        raise DataError(f"{path} needs at least 8 rows with both labels (1 = needs the big "
                        f"model, 0 = the small one does); it has {len(texts)} rows, labels "
                        f"{sorted(set(labels))}.")
    return texts, np.array(labels)


def train_router(features, texts: list[str], labels: np.ndarray, *, kind: str, layers: int,
                 max_tokens: int, l2: float = 1.0, target_share: float = 0.5,
                 source: dict | None = None) -> Router:
    """Fit a :class:`Router` on ``features(texts)``; its default threshold forwards
    ``target_share`` of these prompts."""
    x = features(texts)
    w, b, mean, scale = fit_logistic(x, labels, l2)
    router = Router(kind, layers, max_tokens, w.tolist(), b, mean.tolist(), scale.tolist(),
                    0.5, source or {})
    router.threshold = float(np.quantile(router.scores(x), target_share))
    return router


def run_train(cfg):
    """``slm route train``: features of every prompt, a held-out check, the router."""
    from slmkit.models import load_model
    from slmkit.models.io import commit_out_dir, discard_out_dir, prepare_out_dir
    from slmkit.step import StepResult

    cfg.apply_threads()
    texts, labels = read_rows(cfg.data, cfg.margin)
    final, tmp = prepare_out_dir(cfg.output(), cfg.overwrite)
    try:
        model, tok = load_model(cfg.model)
        feats = MiniLMFeatures(cfg.max_tokens) if cfg.features == "minilm" else \
            HiddenFeatures(model, tok, cfg.layers, cfg.max_tokens)
        start = time.perf_counter()
        x = feats(texts)
        per_prompt_ms = (time.perf_counter() - start) * 1000 / len(texts)
        # held-out check: fit on 80%, score the other 20% (AUC of "needs big")
        rng = np.random.default_rng(cfg.seed)   # stratified: 20% of each label held out
        te = np.concatenate([rng.permutation(np.nonzero(labels == c)[0])[
            :max(1, int(0.2 * (labels == c).sum()))] for c in (0, 1)])
        tr = np.setdiff1d(np.arange(len(texts)), te)
        held = None
        if len(te) and len(set(labels[tr])) == 2:
            w, b, mean, scale = fit_logistic(x[tr], labels[tr], cfg.l2)
            z = ((x[te] - mean) / scale) @ w + b
            held = auc(z, labels[te] == 1)
        source = {"model": cfg.model, "data": cfg.data, "rows": len(texts),
                  "needs_big": int(labels.sum()), "held_out_auc": held}
        router = train_router(lambda _: x, texts, labels, kind=cfg.features,
                              layers=cfg.layers, max_tokens=cfg.max_tokens, l2=cfg.l2,
                              target_share=cfg.target_share, source=source)
        router.save(tmp)
        commit_out_dir(tmp, final)
    except BaseException:
        discard_out_dir(tmp)
        raise
    rows = [("router", str(final)), ("prompts", f"{len(texts)} ({int(labels.sum())} need "
                                                 "the big model)"),
            ("features", f"{cfg.features}" + (f", {cfg.layers} layers" if cfg.features ==
                                              "hidden" else "") + f", {x.shape[1]} dims"),
            ("held-out AUC (20%)", "n/a" if held is None else f"{held:.3f}"),
            ("threshold", f"{router.threshold:.4f} (forwards {cfg.target_share:.0%} of "
                          "these prompts)"),
            ("features per prompt", f"{per_prompt_ms:.2f} ms")]
    return StepResult("route train", out=str(final),
                      figures={"held_out_auc": held, "threshold": router.threshold,
                               "rows": len(texts), "feature_ms": per_prompt_ms}, rows=rows)
