"""A multi-turn chat session over the engine: history, chat template, streaming replies.

The terminal ``slm chat`` is a thin loop around :class:`ChatSession`; a notebook or a test
can drive the same class.
"""

from __future__ import annotations

from collections.abc import Iterator

from slmkit.engine.engine import Engine
from slmkit.engine.events import Completion, FinishEvent
from slmkit.engine.generate import chat_stop_ids, encode_prompt
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import ConfigError


class ChatSession:
    """Keeps the conversation and streams each assistant reply.

    Args:
        model, tokenizer: the chat model (its tokenizer must have a chat template).
        params: sampling parameters for every reply; stop ids of the template's end-of-turn
            tokens (``<|im_end|>`` ...) are added.
        system: optional system prompt, kept across :meth:`reset`.
        max_seq_len: context for prompt plus reply (default: the model's, at most 2048).
    """

    def __init__(self, model, tokenizer, params: SamplingParams | None = None,
                 system: str | None = None, max_seq_len: int | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("This model's tokenizer has no chat template; use `slm generate` "
                              "for plain completion, or add a chat_template to "
                              "tokenizer_config.json.")
        self.tokenizer = tokenizer
        base = params or SamplingParams(temperature=0.7, top_p=0.95, max_tokens=256)
        stop_ids = sorted(set(base.stop_token_ids) | set(chat_stop_ids(tokenizer)))
        self.params = SamplingParams(**{**base.__dict__, "stop_token_ids": stop_ids})
        self.system = system
        self.engine = Engine(model, tokenizer, max_batch=1, max_seq_len=max_seq_len,
                             background=False)
        self.history: list[dict] = []
        self.last: Completion | None = None
        self.dropped_turns = 0

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history = []
        self.dropped_turns = 0

    def _prompt_ids(self, message: str) -> list[int]:
        """Template the history plus ``message``; drop the oldest turns until it fits."""
        budget = self.engine.max_seq_len - self.params.max_tokens
        while True:
            prefix = [{"role": "system", "content": self.system}] if self.system else []
            ids = encode_prompt(self.tokenizer, message, chat=True,
                                history=prefix + self.history)
            if len(ids) <= max(budget, 1) or not self.history:
                break
            self.history = self.history[2:]
            self.dropped_turns += 1
        if len(ids) >= self.engine.max_seq_len:
            raise ConfigError(f"The message is {len(ids)} tokens with the chat template, more "
                              f"than the model's context of {self.engine.max_seq_len}; send a "
                              "shorter message.")
        return ids

    def send(self, message: str) -> Iterator[str]:
        """Stream the assistant's reply to ``message`` as text deltas; record the turn."""
        self.last = None
        ids = self._prompt_ids(message)
        params = self.params
        if params.seed is not None:  # reproducible, but a fresh draw for every turn
            params = SamplingParams(**{**params.__dict__, "seed": params.seed + len(self.history)})
        handle = self.engine.submit(ids, params)
        reply = []
        try:
            for event in handle:
                if event.text:
                    reply.append(event.text)
                    yield event.text
                if isinstance(event, FinishEvent):
                    self.last = event.completion
        finally:
            if not handle.done:  # interrupted (Ctrl-C, closed generator): free the slot
                handle.cancel()
                handle.result()
        self.history += [{"role": "user", "content": message},
                         {"role": "assistant", "content": "".join(reply)}]

    def close(self) -> None:
        self.engine.close()
