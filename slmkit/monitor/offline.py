"""``slm monitor MODEL --prompts FILE``: a model's requests scored offline.

Each prompt of the file goes through the engine as a chat turn (a plain completion where the
tokenizer has no chat template), greedy, with the same confidence figures and flag the
server reports (the shipped hidden-state probe where it was fitted on this model), and
lands in a request log exactly as ``slm serve --request-log`` would write it; the drift
report then reads that log (:func:`slmkit.monitor.report.run`).
"""

from __future__ import annotations

from pathlib import Path

SQLITE_MAGIC = b"SQLite format 3\x00"


def is_request_log(ref: str) -> bool:
    """An existing SQLite file (a request log, or a damaged one ``connect`` names)."""
    p = Path(ref).expanduser()
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


def looks_like_model(ref: str) -> bool:
    """A model reference ``load_model`` takes (a built-in name, a model dir, a .gguf file,
    or a hub id's ``owner/name`` form)."""
    p = Path(ref).expanduser()
    if ref.startswith("builtin:") or ref.endswith(".gguf") or (p / "config.json").is_file():
        return True
    return not p.exists() and ref.count("/") == 1 and not ref.endswith((".db", ".sqlite"))


def score_prompts(model_ref: str, prompts: list[dict], log_path: Path, embed=None,
                  max_tokens: int = 64, batch: int = 8) -> int:
    """Answer ``prompts`` (:func:`~slmkit.monitor.text.read_prompts`'s) with the model and
    write a request log of them at ``log_path`` (prompt embeddings with ``embed``, as
    MiniLM's); returns the rows written."""
    from slmkit.engine import Engine, SamplingParams
    from slmkit.models import load_model
    from slmkit.monitor.confidence import FlagModel, summarize
    from slmkit.monitor.log import RequestLog, answer_row

    model, tok = load_model(model_ref)
    flag = FlagModel.load()
    probe = flag.probe_for(model)
    chat = bool(getattr(tok, "chat_template", None))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, confidence=True)
    log = RequestLog(log_path, embed=embed, embedder="minilm" if embed else "",
                     drift_every=0)
    try:
        with Engine(model, tok, max_batch=batch) as engine:
            if probe is not None:
                engine.set_hidden_tap(probe.after)
            handles = [engine.submit(_ids(tok, p, chat), params) for p in prompts]
            for p, h in zip(prompts, handles):
                c = h.result()
                users = [m["content"] for m in p["messages"] or [] if m.get("role") == "user"]
                question = (users[-1] if users else p["text"]) if chat else ""
                conf = summarize(c.confidence, c.text, flag, question=question,
                                 hidden=c.hidden_mean, probe=probe)
                log.record(answer_row(model_ref, "chat" if chat else "completions", c,
                                      c.finish_reason, conf), prompt=p["text"], answer=c.text)
        log.flush()
    finally:
        log.close()
    return len(prompts)


def _ids(tok, prompt: dict, chat: bool) -> list[int]:
    """A prompt's ids: its messages (or its text as one user turn) through the chat
    template, or the plain text where the tokenizer has no template."""
    from slmkit.engine.generate import encode_prompt

    if not chat or not prompt["messages"]:
        return encode_prompt(tok, prompt["text"], chat=chat)
    ids = tok.apply_chat_template(prompt["messages"], add_generation_prompt=True,
                                  tokenize=True)
    return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]

