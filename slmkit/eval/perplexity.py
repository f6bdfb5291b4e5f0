"""Perplexity and bits per byte on held-out text, with a correct sliding window.

Each document is tokenized on its own, prefixed with the end-of-text token (the separator
the training stream uses), and every one of its tokens is scored exactly once with as much
context as the window allows (:func:`slmkit.eval.ops.rolling_windows`, lm-eval's rolling
log-likelihood). Bits per byte divide the total negative log-likelihood by the UTF-8 size
of the scored text, so models with different tokenizers compare fairly (Gao et al., "The
Pile", 2020).

Public contract (used by the compression benchmarks)::

    from slmkit.eval.perplexity import perplexity
    perplexity(model, tokenizer, data="stdlib", split="val", seq_len=512, stride=256,
               max_tokens=None) -> {"tokens", "loss", "ppl", "bits_per_byte", ...}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from slmkit.errors import ConfigError, DataError
from slmkit.eval.ops import bits_per_byte, rolling_windows, target_logprobs
from slmkit.models.arch import context_length

DEFAULT_SEQ_LEN = 512


def load_texts(data: Any = "stdlib", split: str = "val", val_fraction: float = 0.05,
               max_bytes: int | None = None) -> list[tuple[str, str]]:
    """Materialise evaluation documents as ``(id, text)`` pairs.

    Args:
        data: a corpus spec for :func:`slmkit.data.corpus.iter_documents` (``"stdlib"``,
            a file, dir, glob or ``.jsonl``; or a list of them), or any other iterable
            (tuple, generator) of ``Document``-like objects (``.id``/``.text``),
            ``(id, text)`` pairs or raw strings.
        split: ``"val"``, ``"train"`` or ``"all"`` (only used for corpus specs).
        val_fraction: validation fraction of the corpus split.
        max_bytes: keep documents in order until this many UTF-8 bytes; the last one is cut
            at a character boundary. The same text for every model, whatever its tokenizer.

    Raises:
        DataError: the data holds no text.
    """
    if isinstance(data, str) or (isinstance(data, list) and data
                                 and all(isinstance(d, str) for d in data)):
        from slmkit.data.corpus import iter_documents

        items: Iterable = iter_documents(data, split=split, val_fraction=val_fraction)
    else:
        items = data
    docs: list[tuple[str, str]] = []
    total = 0
    for i, item in enumerate(items):
        doc_id, text = _as_pair(item, i)
        if not text:
            continue
        if max_bytes:
            raw = text.encode("utf-8")
            if total + len(raw) > max_bytes:
                text = raw[: max_bytes - total].decode("utf-8", errors="ignore")
            total += len(text.encode("utf-8"))
        if text:
            docs.append((doc_id, text))
        if max_bytes and total >= max_bytes:
            break
    if not docs:
        raise DataError(f"Evaluation data {_describe(data)} (split '{split}') holds no text; "
                        "pass --data with a non-empty corpus, file or .jsonl.")
    return docs


def _as_pair(item, i: int) -> tuple[str, str]:
    if isinstance(item, str):
        return f"text:{i}", item
    if isinstance(item, tuple) and len(item) == 2:
        return str(item[0]), str(item[1])
    return str(getattr(item, "id", i)), str(getattr(item, "text", ""))


def _describe(data) -> str:
    if isinstance(data, (str, list, tuple)):
        return repr(data if isinstance(data, str) else list(data)[:3])
    return f"<{type(data).__name__}>"


def encode_documents(tokenizer, docs: list[tuple[str, str]], max_tokens: int | None = None
                     ) -> tuple[list[list[int]], int]:
    """Tokenize documents (no special tokens) and count the UTF-8 bytes that get scored.

    Returns:
        ``(token_lists, n_bytes)``; with ``max_tokens`` the token lists hold at most that
        many tokens in total, the last one cut, and ``n_bytes`` counts only the text its
        kept tokens cover (from the tokenizer's character offsets).
    """
    out: list[list[int]] = []
    n_bytes = 0
    budget = max_tokens if max_tokens else None
    for _, text in docs:
        enc = tokenizer(text, add_special_tokens=False,
                        return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
        ids = list(enc["input_ids"])
        if not ids:
            continue
        if budget is not None and len(ids) >= budget:
            ids = ids[:budget]
            if "offset_mapping" in enc:
                covered = text[: enc["offset_mapping"][budget - 1][1]]
            else:
                covered = tokenizer.decode(ids)
            n_bytes += len(covered.encode("utf-8"))
            out.append(ids)
            break
        n_bytes += len(text.encode("utf-8"))
        out.append(ids)
        if budget is not None:
            budget -= len(ids)
    return out, n_bytes


def perplexity(model, tokenizer, data: Any = "stdlib", split: str = "val",
               seq_len: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, max_bytes: int | None = None,
               val_fraction: float = 0.05, batch_size: int = 8) -> dict[str, Any]:
    """Sliding-window perplexity and bits per byte of ``model`` on held-out documents.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(B, T, V)``.
        tokenizer: its tokenizer.
        data: corpus spec or documents (see :func:`load_texts`); default the stdlib.
        split: corpus split; default ``"val"``.
        seq_len: window length; default ``min(model context, 512)``.
        stride: new tokens scored per window after the first; default ``seq_len // 2``.
            Each token then sees at least ``seq_len - stride`` tokens of context.
        max_tokens: score at most this many tokens (documents in order, last one cut).
        max_bytes: use at most this many bytes of text (same text for every tokenizer).
        val_fraction: validation fraction for the corpus split.
        batch_size: windows of equal length run together.

    Returns:
        ``{"tokens", "loss" (nats/token), "ppl", "bits_per_byte", "bytes", "nll",
        "documents", "seq_len", "stride", "split"}``.

    Raises:
        DataError: empty data. ConfigError: a window/stride that cannot work.
    """
    import torch

    from slmkit.console import progress

    limit = context_length(model.config)
    seq_len = seq_len or min(limit or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if limit and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context of {limit} "
                          f"tokens; use --seq-len {limit} or less.")
    stride = stride or max(1, seq_len // 2)
    if seq_len < 2 or not 1 <= stride < seq_len:
        raise ConfigError(f"--stride {stride} must be at least 1 and smaller than --seq-len "
                          f"{seq_len}; the default is half the window.")
    docs = load_texts(data, split, val_fraction, max_bytes)
    token_lists, n_bytes = encode_documents(tokenizer, docs, max_tokens)
    if not token_lists:
        raise DataError(f"Evaluation data {_describe(data)} tokenizes to no tokens; pass "
                        "--data with real text.")
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
        else tokenizer.bos_token_id
    if prefix is None:
        raise ConfigError("The tokenizer has neither an eos nor a bos token to start "
                          "documents with; add one to its special tokens.")
    seqs = [torch.tensor([prefix] + ids, dtype=torch.long) for ids in token_lists]
    jobs = [(d, b, e, f) for d, s in enumerate(seqs) for b, e, f in
            rolling_windows(len(s), seq_len, stride)]
    jobs.sort(key=lambda j: -(j[2] - j[1]))  # equal lengths side by side -> no padding
    device = next(model.parameters()).device
    nll = 0.0
    scored = 0
    with torch.inference_mode(), progress("perplexity", total=len(jobs)) as update:
        i = 0
        while i < len(jobs):
            length = jobs[i][2] - jobs[i][1]
            group = [jobs[i]]
            while (len(group) < batch_size and i + len(group) < len(jobs)
                   and jobs[i + len(group)][2] - jobs[i + len(group)][1] == length):
                group.append(jobs[i + len(group)])
            x = torch.stack([seqs[d][b:e] for d, b, e, _ in group]).to(device)  # (B, L)
            logits = model(input_ids=x).logits  # (B, L, V)
            for row, (d, b, e, f) in enumerate(group):
                # logits row t predicts x[t+1]; targets f..e-1 <- rows f-1-b .. e-2-b
                lp = target_logprobs(logits[row, f - 1 - b:e - 1 - b], x[row, f - b:e - b])
                nll -= float(lp.double().sum())
                scored += e - f
            i += len(group)
            update(len(group), info=f"ppl {math.exp(nll / max(scored, 1)):.2f}")
    loss = nll / scored
    return {
        "tokens": scored, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
        "bits_per_byte": bits_per_byte(nll, n_bytes), "bytes": n_bytes, "nll": nll,
        "documents": len(token_lists), "seq_len": seq_len, "stride": stride, "split": split,
    }
