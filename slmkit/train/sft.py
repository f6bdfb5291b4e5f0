"""Supervised fine-tuning (SFT) data: chat-template formatting, prompt masking, batches.

SFT is not a second training loop: the one loop's :class:`~slmkit.train.objectives.LMObjective`
already skips :data:`~slmkit.train.ops.IGNORE_INDEX` labels, so all SFT needs is a batch
source whose labels are masked on the prompt. The loss is then the mean cross-entropy over
completion tokens only (Ouyang et al. 2022, "Training language models to follow
instructions", and the usual instruction-tuning recipe).

Data: the JSONL rows of :mod:`slmkit.data.corpus` (``prompt``/``completion`` or chat
``messages``). A prompt/completion row becomes the two-message chat ``user: prompt`` /
``assistant: completion``; every row is rendered with the tokenizer's chat template. In a
chat row the last message must be the assistant's: it is the completion, everything before
it is the prompt. A conversation with tool calls (OpenAI format: assistant ``tool_calls``,
``role: "tool"`` results, a ``tools`` list per row; or ``--data function-calling``, the
built-in set's train split) is rendered the way the server prompts that model
(:func:`slmkit.engine.tool_formats.render_chat`: the template's own tool format when it
has one, such as Qwen2.5's ``<tool_call>`` blocks or Llama 3.2's JSON calls, else the
generic format of :mod:`slmkit.engine.tools`) and trained on every assistant turn, calls
and answers alike.

Bad rows are refused with the file and line: a missing field, an empty completion, or a
sample longer than the context (``--seq-len``). Items of a built-in task (``--data
stdlib-docstring``, see :mod:`slmkit.train.task_data`) longer than the context are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slmkit.errors import DataError
from slmkit.train.ops import IGNORE_INDEX

__all__ = ["SFTExample", "format_example", "load_sft_examples", "SFTBatches", "masked_labels"]


@dataclass(frozen=True)
class SFTExample:
    """One tokenized SFT sample.

    Attributes:
        ids: the full token ids (prompt + completion + end-of-turn), length ``L``.
        n_prompt: how many leading ids belong to the prompt (never trained on).
        where: ``"<file> line <n>"`` for messages about this sample.
        spans: for a conversation with several assistant turns (tool calls, then the
            answer), the ``[start, end)`` id ranges trained on; None: all ids from
            ``n_prompt`` on.
    """

    ids: list[int]
    n_prompt: int
    where: str
    spans: tuple[tuple[int, int], ...] | None = None


def _where(doc_id: str) -> str:
    path, _, line = doc_id.rpartition(":")
    return f"{path} line {line}" if line.isdigit() else doc_id


def _split_messages(doc, where: str) -> tuple[list[dict], list[dict]]:
    """(prompt messages, full messages) of a corpus document, or a DataError."""
    if doc.messages is not None:
        msgs = list(doc.messages)
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(f"{where}: the last message must be the assistant's completion "
                            "after at least one prompt message; add an assistant reply.")
        completion = msgs[-1]["content"]
        prompt_msgs = msgs[:-1]
    elif doc.prompt is not None:
        completion = doc.text[len(doc.prompt):]
        msgs = [{"role": "user", "content": doc.prompt},
                {"role": "assistant", "content": completion}]
        prompt_msgs = msgs[:1]
    else:
        raise DataError(f"{where} has no 'prompt'+'completion' or 'messages' field (a plain "
                        "'text' row is pretraining data); add both fields.")
    if not completion.strip():
        raise DataError(f"{where} has an empty completion; write a completion or remove the "
                        "line.")
    return prompt_msgs, msgs


def format_example(tok, doc, where: str | None = None, template: str = "chat") -> SFTExample:
    """Render one corpus document with the chat template and find the prompt/completion cut.

    The prompt is rendered with ``add_generation_prompt=True`` (it ends with the assistant
    header), so the model learns to continue exactly where inference will ask it to. A
    tokenizer without a chat template, or ``template="plain"`` (for tasks scored on raw
    prompts, like ``slm eval --tasks stdlib-docstring``), uses ``prompt + completion + eos``.
    """
    where = where or doc.where or _where(doc.id)
    if doc.tools is not None or (doc.messages and any(
            m.get("tool_calls") or m["role"] == "tool" for m in doc.messages)):
        return _format_tool_example(tok, doc, where, template)
    prompt_msgs, msgs = _split_messages(doc, where)
    if template == "chat" and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
    else:
        prompt = "".join(m["content"] for m in prompt_msgs)
        full = prompt + msgs[-1]["content"] + (tok.eos_token or "")
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template renders the prompt differently inside the "
                        "full conversation, so the completion cannot be located; use a "
                        "prefix-stable chat template.")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return SFTExample(ids=p_ids + c_ids, n_prompt=len(p_ids), where=where)


def _format_tool_example(tok, doc, where: str, template: str) -> SFTExample:
    """A conversation with tool calls, rendered as the server prompts this tokenizer's
    model (:func:`slmkit.engine.tool_formats.render_chat`), trained on every
    assistant turn (each call and each answer, end-of-turn included) and nothing else:
    the system prompt, the user's turns and the tool results are masked."""
    from slmkit.engine.tool_formats import render_chat
    from slmkit.engine.tools import ToolFormatError, parse_tools

    if template != "chat" or not getattr(tok, "chat_template", None):
        raise DataError(f"{where}: a conversation with tool calls needs the tokenizer's chat "
                        "template; use --template chat with a chat model.")
    if doc.messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (a call or an "
                        "answer); add it or drop the trailing messages.")
    try:
        conv, kwargs = render_chat(tok, doc.messages, parse_tools(doc.tools) if doc.tools
                                   else None)
    except ToolFormatError as e:
        raise DataError(f"{where} has a bad '{e.param}': {e}.") from None
    ids: list[int] = []
    spans = []
    done = ""                                           # the text rendered so far
    for k, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip() and not m.get("tool_calls"):
            raise DataError(f"{where} has an empty assistant turn; give it content or "
                            "tool_calls.")
        prompt = tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True,
                                         **kwargs)
        full = tok.apply_chat_template(conv[:k + 1], tokenize=False, **kwargs)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template renders earlier turns differently "
                            "once later ones follow, so the assistant turns cannot be "
                            "located; use a prefix-stable chat template.")
        ids += tok(prompt[len(done):], add_special_tokens=False)["input_ids"]
        start = len(ids)
        ids += tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        spans.append((start, len(ids)))
        done = full
    return SFTExample(ids=ids, n_prompt=spans[0][0], where=where, spans=tuple(spans))


def load_sft_examples(spec: str | list[str], tok, seq_len: int, template: str = "chat",
                      max_samples: int | None = None) -> list[SFTExample]:
    """Read and tokenize every SFT row of ``spec`` (``template``: chat or plain).

    ``spec`` is a JSONL file (or several), an ``slm augment`` output dir (its
    ``data.jsonl``) or a built-in generation task such as ``stdlib-docstring`` (its items
    mined from the corpus train split; see :mod:`slmkit.train.task_data`).

    Args:
        max_samples: keep at most this many samples (the first rows; for a built-in task
            the first items in mining order). None keeps all.

    Raises:
        DataError: no rows, or a bad row (file and line named), or a row longer than
        ``seq_len + 1`` tokens (it would be cut, training on half a completion).
    """
    from pathlib import Path

    from slmkit.data.corpus import Document, iter_documents
    from slmkit.eval.function_calling import TASK as FC_TASK
    from slmkit.eval.function_calling import training_rows as fc_training_rows
    from slmkit.train.task_data import builtin_task_rows, is_builtin_task, resolve_data_file

    specs = [spec] if isinstance(spec, str) else list(spec)
    docs = []                                    # (document, where)
    for s in specs:
        if s == FC_TASK and not Path(s).exists():       # built-in tool conversations
            left = None if max_samples is None else max_samples - len(docs)
            docs += [(Document(f"{s}:{i}", "", messages=r["messages"], tools=r["tools"]),
                      f"{s} conversation {i}")
                     for i, r in enumerate(fc_training_rows("train", left))]
        elif is_builtin_task(s):
            left = None if max_samples is None else max_samples - len(docs)
            docs += [(Document(r["id"], r["prompt"] + r["completion"], prompt=r["prompt"]),
                      f"{s} item {r['id']}") for r in builtin_task_rows(s, left)]
        else:
            for doc in iter_documents(resolve_data_file(s), split="all"):
                if max_samples is not None and len(docs) >= max_samples:
                    break
                docs.append((doc, None))
        if max_samples is not None and len(docs) >= max_samples:
            break
    out, too_long = [], 0
    for doc, where in docs:
        ex = format_example(tok, doc, where=where, template=template)
        if len(ex.ids) > seq_len + 1 and where is not None:
            too_long += 1                       # a mined item: skip it, the user cannot fix it
            continue
        if len(ex.ids) > seq_len + 1:
            raise DataError(f"{ex.where} is {len(ex.ids):,} tokens, longer than the context "
                            f"(--seq-len {seq_len}); shorten it or raise --seq-len.")
        out.append(ex)
    if too_long:
        from slmkit.console import log

        log.info("skipped %d built-in task items longer than --seq-len %d", too_long, seq_len)
    if not out:
        raise DataError(f"No fine-tuning samples in {spec} fit --seq-len {seq_len}; add JSONL "
                        "rows with 'prompt'/'completion' or 'messages', or raise --seq-len.")
    return out


def masked_labels(ex: SFTExample) -> tuple[list[int], list[int]]:
    """Inputs and next-token labels of one sample, prompt targets masked.

    Returns:
        ``(inputs, labels)``, both length ``L - 1``: ``labels[t] = ids[t + 1]`` when that
        token is part of the completion, else :data:`IGNORE_INDEX`.
    """
    inputs = ex.ids[:-1]
    if ex.spans is not None:
        trained = [False] * len(ex.ids)
        for start, end in ex.spans:
            trained[start:end] = [True] * (end - start)
        return inputs, [tid if trained[t + 1] else IGNORE_INDEX
                        for t, tid in enumerate(ex.ids[1:])]
    labels = [tid if t + 1 >= ex.n_prompt else IGNORE_INDEX
              for t, tid in enumerate(ex.ids[1:])]
    return inputs, labels


class SFTBatches:
    """A deterministic batch source of SFT samples for the one training loop.

    Batch ``index`` -> ``input_ids``/``labels``/``attention_mask`` ``[B, W]`` (``W <= T``:
    the longest row of the batch) with right padding (pad positions: attention 0, label :data:`IGNORE_INDEX`). With ``pack=True``
    several samples share one row (greedy first-fit in data order; they attend to each
    other, the usual cheap packing), so fewer pad tokens are computed.

    Args:
        examples: the tokenized samples.
        seq_len: row length ``T``.
        batch_size: rows per micro-batch ``B``.
        pad_id: token id written into padding.
        seed: seeds the per-epoch order of rows.
        pack: pack several samples per row.
    """

    def __init__(self, examples: list[SFTExample], seq_len: int, batch_size: int,
                 pad_id: int, seed: int = 0, pack: bool = False):
        self.seq_len, self.batch_size, self.pad_id, self.seed = seq_len, batch_size, pad_id, seed
        rows: list[tuple[list[int], list[int]]] = []
        for ex in examples:
            inp, lab = masked_labels(ex)
            if pack and rows and len(rows[-1][0]) + len(inp) <= seq_len:
                rows[-1][0].extend(inp)
                rows[-1][1].extend(lab)
            else:
                rows.append((list(inp), list(lab)))
        self.rows = rows
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.rows)))
        return self._perm[1]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, g in enumerate(range(index * B, (index + 1) * B)):
            epoch, pos = divmod(g, len(self.rows))
            inp, lab = self.rows[int(self._order(epoch)[pos])]
            n = len(inp)
            ids[b, :n] = torch.tensor(inp)
            labels[b, :n] = torch.tensor(lab)
            mask[b, :n] = 1
        width = int(mask.sum(1).max())                      # trim padding shared by all rows
        return {"input_ids": ids[:, :width], "labels": labels[:, :width],
                "attention_mask": mask[:, :width]}

    @property
    def epoch_batches(self) -> float:
        return len(self.rows) / self.batch_size
