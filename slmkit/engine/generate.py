"""One-request helpers over the runners and the engine.

* :func:`stream_tokens` is the cross-team speed contract used by ``slmkit.eval``: greedy
  ids one at a time, no threads, no text, the least overhead per token.
* :func:`stream_text` and :func:`generate_text` take a prompt string and give text.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from slmkit.engine.events import Completion
from slmkit.engine.runner import make_runner
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import ConfigError
from slmkit.models import arch


def stream_tokens(model, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
    """Yield greedy next-token ids one at a time, using the fastest correct path.

    The first id is yielded right after the one-pass prefill (so the time to the first
    yield is the time to first token). End-of-sequence tokens do not stop the stream: it
    yields exactly ``max_new_tokens`` ids unless the model's context runs out first.

    Args:
        model: a causal LM (any architecture :func:`slmkit.load_model` returns).
        prompt_ids: the prompt, non-empty.
        max_new_tokens: ids to yield.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ConfigError("The prompt is empty; pass at least one token id.")
    context = arch.context_length(model.config)
    total = len(prompt) + max_new_tokens
    if context:
        total = min(total, context)
    if max_new_tokens <= 0 or len(prompt) >= total:
        return
    runner = make_runner(model, n_slots=1, max_seq_len=total)
    logits = runner.forward(torch.tensor([prompt]), [0], [0])        # [1, V]
    token = int(torch.argmax(logits[0]))
    yield token
    for pos in range(len(prompt), total - 1):
        logits = runner.forward(torch.tensor([[token]]), [0], [pos])  # [1, V]
        token = int(torch.argmax(logits[0]))
        yield token


def encode_prompt(tokenizer, prompt: str, chat: bool = False,
                  history: list[dict] | None = None) -> list[int]:
    """Token ids of a plain prompt, or of a chat turn through the tokenizer's template.

    Args:
        prompt: the text (the new user message when ``chat``).
        chat: apply the chat template with a generation prompt.
        history: earlier ``{"role", "content"}`` messages (chat only).
    """
    if not chat:
        return prompt_ids(tokenizer, prompt) or (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("This model's tokenizer has no chat template; use `slm generate` "
                          "for plain completion, or add a chat_template to tokenizer_config.json.")
    messages = [*(history or []), {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-completion prompt, as ``tokenizer(text)`` gives them to
    ``model.generate`` in transformers: with the tokenizer's own leading special tokens
    (Gemma's ``<bos>``, Llama 3's ``<|begin_of_text|>``; models trained with one write
    garbage without it), but never a trailing end-of-sequence token (which would end the
    text before it starts)."""
    ids = [int(t) for t in tokenizer(text)["input_ids"]]
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and not text.endswith(
            str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


def chat_stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn in common chat templates (e.g. ``<|im_end|>``)."""
    out = []
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            out.append(tid)
    return out


def stream_text(model, tokenizer, prompt: str, params: SamplingParams | None = None,
                chat: bool = False) -> Iterator[str]:
    """Yield text deltas for one prompt string (complete UTF-8 characters only)."""
    from slmkit.engine.engine import Engine

    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    engine = Engine(model, tokenizer, max_batch=1, background=False,
                    max_seq_len=_seq_len(model, len(ids), params.max_tokens))
    yield from engine.submit(ids, params).text_deltas()


def generate_text(model, tokenizer, prompt: str, params: SamplingParams | None = None,
                  chat: bool = False) -> Completion:
    """Generate for one prompt string and return the :class:`Completion`."""
    from slmkit.engine.engine import Engine

    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    engine = Engine(model, tokenizer, max_batch=1, background=False,
                    max_seq_len=_seq_len(model, len(ids), params.max_tokens))
    return engine.generate(ids, params)


def _seq_len(model, prompt_len: int, max_tokens: int) -> int:
    """Cache length for one request: prompt plus output, capped at the model's context."""
    context = arch.context_length(model.config) or (prompt_len + max_tokens)
    return max(2, min(prompt_len + max_tokens + 1, context))
