"""Batch-1 greedy decoding on the plain transformers KV cache, and its decode speed.

:mod:`slmkit.engine` is slmkit's fast generation path, and ``slm eval`` measures speed
through it (:func:`slmkit.eval.speed.measure_speed`). Steps in the layers below the engine
(structured pruning's before / after figure) time this loop instead: both models run the
same path side by side, so their ratio is fair, but the absolute figures are those of
transformers' own forward pass, not the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator


def greedy_stream(model, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
    """Greedy decoding with the transformers KV cache; yields one token id at a time.

    The first id is yielded right after the prefill forward pass (so the time to the first
    yield is the time to first token); each later one after one single-token decode step.

    Args:
        model: a causal LM.
        prompt_ids: the prompt, ``len >= 1``.
        max_new_tokens: how many ids to yield (no early stop on eos: callers decide).
    """
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        out = model(input_ids=x, use_cache=True)
        past = out.past_key_values
        for i in range(max_new_tokens):
            next_id = int(out.logits[0, -1].argmax())
            yield next_id
            if i + 1 == max_new_tokens:
                break
            step = torch.tensor([[next_id]], dtype=torch.long, device=device)  # (1, 1)
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values


def decode_tok_s(model, prompt_ids: list[int], new_tokens: int) -> float | None:
    """Decode tokens/s of :func:`greedy_stream`: the tokens after the first over the time
    after the first (the prefill is not counted); None when fewer than two come."""
    count, t_first = 0, 0.0
    for _ in greedy_stream(model, prompt_ids, max(2, new_tokens)):
        count += 1
        if count == 1:
            t_first = time.perf_counter()
    elapsed = time.perf_counter() - t_first
    return (count - 1) / elapsed if count > 1 and elapsed > 0 else None
