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

from importlib import import_module

#: Public names and the module each lives in. They are imported on first use, so that
#: light modules of this package (``engine.options``, which the CLI imports to build its
#: flags) do not pull in torch.
_EXPORTS = {"Engine": "engine", "RequestHandle": "engine", "Completion": "events",
            "FinishEvent": "events", "TokenEvent": "events", "generate_text": "generate",
            "stream_text": "generate", "stream_tokens": "generate", "Grammar": "grammar",
            "SamplingParams": "sampling"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"slmkit.engine.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slmkit.engine' has no attribute '{name}'")
