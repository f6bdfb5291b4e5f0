"""Greedy generation for evaluation, through the engine's fastest path per model.

Evaluation has no generation code path of its own to maintain: speed figures and
generation tasks both go through :func:`get_stream_tokens`, which is
``slmkit.engine.stream_tokens``, and batched tasks through ``slmkit.engine.Engine``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from slmkit.models.arch import context_length


def get_stream_tokens() -> tuple[Callable[..., Iterator[int]], str]:
    """``(stream_tokens, name)``: the engine's greedy token stream and its name."""
    from slmkit.engine import stream_tokens

    return stream_tokens, "slmkit.engine"


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 32,
                    stop: Sequence[str] = ("\n",), stream=None) -> str:
    """Greedy completion of ``prompt``, cut at the first stop string or end-of-text.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompt: text to continue.
        max_new_tokens: generation budget.
        stop: strings that end the completion (not included in it).
        stream: a ``stream_tokens`` function; default :func:`get_stream_tokens`.

    Returns:
        The completion text (without the prompt and the stop string).
    """
    stream = stream or get_stream_tokens()[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    limit = context_length(model.config)
    if limit and len(ids) + max_new_tokens > limit:
        ids = ids[-max(1, limit - max_new_tokens):]
    eos = tokenizer.eos_token_id
    new: list[int] = []
    text = ""
    for tid in stream(model, list(ids), max_new_tokens):
        if tid == eos:
            break
        new.append(tid)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if any(s and s in text for s in stop):
            break
    cut = min((text.index(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


def greedy_generate_many(model, tokenizer, requests: Sequence[tuple[str, int, Sequence[str]]],
                         batch: int = 8, on_done: Callable[[], None] | None = None
                         ) -> list[str]:
    """:func:`greedy_generate` for many prompts at once, batched through the engine.

    Each request is ``(prompt, max_new_tokens, stop strings)``; the texts come back in
    order and are the same as :func:`greedy_generate`'s (greedy output does not depend on
    what else is in the batch: the engine tests this). With ``batch <= 1`` it makes one
    :func:`greedy_generate` call per request.

    Args:
        batch: concurrent sequences in the engine.
        on_done: called once per finished request (progress bars).
    """
    if batch <= 1:
        out = []
        for prompt, n, stop in requests:
            out.append(greedy_generate(model, tokenizer, prompt, n, stop))
            if on_done:
                on_done()
        return out
    from slmkit.engine import SamplingParams

    limit = context_length(model.config)
    jobs = []
    for prompt, n, stop in requests:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
        if limit and len(ids) + n > limit:
            ids = ids[-max(1, limit - n):]
        jobs.append((list(ids), SamplingParams(max_tokens=n, temperature=0,
                                               stop=[s for s in stop if s])))
    return generate_many(model, tokenizer, jobs, batch=batch, on_done=on_done)


def generate_many(model, tokenizer, jobs, batch: int = 8,
                  on_done: Callable[[], None] | None = None) -> list[str]:
    """The texts of ``jobs`` (``(prompt ids, SamplingParams)`` pairs: a grammar, stop
    tokens...) run ``batch`` at a time through one engine, in order."""
    import torch

    from slmkit.engine import Engine

    limit = context_length(model.config)
    longest = max(len(ids) + p.max_tokens + 1 for ids, p in jobs)
    engine = Engine(model, tokenizer, max_batch=max(1, batch), background=False,
                    max_seq_len=min(longest, limit) if limit else longest,
                    threads=torch.get_num_threads())
    try:
        handles = [engine.submit(ids, p) for ids, p in jobs]
        texts = []
        for h in handles:
            texts.append(h.result().text)
            if on_done:
                on_done()
        return texts
    finally:
        engine.close()
