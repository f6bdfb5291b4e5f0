"""``POST /v1/embeddings`` from the served model itself: mean-pooled last hidden states.

An embedding is the mean, over the input's tokens, of the model's last hidden state (the
output of the final norm, before the LM head), L2-normalised to length 1 as OpenAI's
embeddings are, so a dot product is the cosine similarity. A causal LM is no dedicated
embedding model -- its vectors are good enough for clients that need the endpoint
(a cache key, a rough similarity), not for retrieval quality; a dedicated embedding
model arrives with RAG.

Shapes follow OpenAI: ``input`` is a string, a list of strings, a list of token ids or
a list of such lists; ``encoding_format`` is ``float`` (default) or ``base64`` (the
little-endian float32 bytes, which the ``openai`` client asks for and decodes);
``dimensions`` is accepted only when it equals the model's hidden size (these vectors
cannot be shortened); ``usage`` counts the input tokens.

Inputs run in padded batches: padding goes on the right, and under causal attention no
real token sees a pad, so a text's vector does not depend on what it was batched with.
The forward runs in a worker thread, one batch at a time, beside the engine's thread.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import torch

from slmkit.serve.protocol import APIError, EmbeddingRequest

#: OpenAI's limit on inputs per request.
MAX_INPUTS = 2048
BATCH = 16


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"Invalid '{param}': {message}.", param=param)


class Embedder:
    """Mean-pooled, normalised last hidden states of ``model``.

    Args:
        model: a causal LM (the one being served).
        encode: ``encode(text_or_ids, param) -> ids``, raising a 400 that names ``param``
            for an input that cannot be used (the server's own prompt encoder and cap).
    """

    def __init__(self, model, encode):
        self.model, self.encode = model, encode
        self.body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        self.dim = int(model.config.hidden_size)
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    def token_lists(self, req: EmbeddingRequest) -> list[list[int]]:
        """``input`` as token id lists, each checked (400 naming ``input`` or ``input.i``)."""
        data = req.input
        single = isinstance(data, str) or bool(data and isinstance(data[0], int))
        if single:
            data = [data]
        if not data:
            raise _bad("input", "send a string or a non-empty list of strings")
        if len(data) > MAX_INPUTS:
            raise _bad("input", f"{len(data)} inputs are over the limit of {MAX_INPUTS}; "
                       "split the request")
        return [self.encode(item, "input" if single else f"input.{i}")
                for i, item in enumerate(data)]

    def check(self, req: EmbeddingRequest) -> None:
        if req.dimensions is not None and req.dimensions != self.dim:
            raise _bad("dimensions", f"this model's embeddings have {self.dim} dimensions and "
                       f"cannot be shortened; leave it out or send {self.dim}")

    @torch.inference_mode()
    def embed(self, ids: list[list[int]]) -> torch.Tensor:
        """``[N, hidden]`` float32 unit vectors, one per token list."""
        with self._lock:
            rows = []
            for start in range(0, len(ids), BATCH):
                batch = ids[start:start + BATCH]
                width = max(map(len, batch))
                tokens = torch.zeros(len(batch), width, dtype=torch.long)
                keep = torch.zeros(len(batch), width, 1)
                for b, seq in enumerate(batch):
                    tokens[b, :len(seq)] = torch.tensor(seq)
                    keep[b, :len(seq)] = 1
                tokens = tokens.to(self.device)
                if self.body is not None:
                    hidden = self.body(input_ids=tokens, use_cache=False).last_hidden_state
                else:
                    hidden = self.model(input_ids=tokens, use_cache=False,
                                        output_hidden_states=True).hidden_states[-1]
                hidden = hidden.float().cpu()                               # [b, T, hidden]
                mean = (hidden * keep).sum(1) / keep.sum(1)                 # [b, hidden]
                rows.append(torch.nn.functional.normalize(mean, dim=-1))
            return torch.cat(rows)

    async def respond(self, req: EmbeddingRequest, model_name: str) -> dict:
        """The OpenAI ``list`` of embeddings for a validated request."""
        self.check(req)
        ids = self.token_lists(req)
        vectors = await asyncio.to_thread(self.embed, ids)
        return embedding_list(vectors.numpy(), sum(map(len, ids)), model_name,
                              req.encoding_format == "base64")


def embedding_list(vectors, tokens: int, model_name: str, as_base64: bool) -> dict:
    """OpenAI's ``list`` of embeddings for ``[N, dim]`` float vectors (numpy)."""
    data = []
    for i, v in enumerate(vectors):
        value = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") \
            if as_base64 else [float(x) for x in v]
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
