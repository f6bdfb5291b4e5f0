"""Fast CPU generation: static KV cache, sampling, streaming and continuous batching.

Public API (stable; the server, eval and router build on it):

* :class:`Engine` -- continuous batching; ``engine.submit(prompt_ids, SamplingParams)``
  returns a :class:`RequestHandle` that streams :class:`TokenEvent`/:class:`FinishEvent`.
* :class:`SamplingParams` -- temperature, top-k/p, min-p, repetition penalty, seed, stops,
  max tokens, logprobs, and a :class:`Grammar` the output must match (a JSON schema, a
  Lark grammar or a regex: constrained decoding).
* :func:`stream_tokens` -- greedy token ids one at a time (the eval speed contract).
* :func:`generate_text` / :func:`stream_text` -- one prompt string in, text out.
"""

from slmkit.engine.engine import Engine, RequestHandle
from slmkit.engine.events import Completion, FinishEvent, TokenEvent
from slmkit.engine.generate import generate_text, stream_text, stream_tokens
from slmkit.engine.grammar import Grammar
from slmkit.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "FinishEvent", "Grammar", "RequestHandle",
           "SamplingParams", "TokenEvent", "generate_text", "stream_text", "stream_tokens"]
