"""``slm monitor MODEL --prompts FILE``: a model's requests scored offline.

Each prompt of the file goes through the engine as a chat turn (a plain completion where the
tokenizer has no chat template), greedy, with the same confidence figures and flag the
server reports (the shipped hidden-state probe where it was fitted on this model), and
lands in a request log exactly as ``slm serve --request-log`` would write it; the drift
report then reads that log (:func:`slmkit.monitor.report.run`).
"""

from __future__ import annotations

from pathlib import Path

from slmkit.errors import ConfigError

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


def read_prompts(path: str) -> list[str]:
    """The prompts of a text file (one per line) or JSONL (``prompt``, ``text`` or
    ``messages``: the last user message)."""
    import json

    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read --prompts {p} ({e}); pass a UTF-8 text or JSONL file "
                          "of prompts.") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"--prompts {p} line {n} is not JSON; write one object per line "
                              "with a 'prompt', 'text' or 'messages' field.") from None
        text = (obj.get("prompt") or obj.get("text")) if isinstance(obj, dict) else None
        if text is None and isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            users = [m for m in obj["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            text = users[-1].get("content") if users else None
        if not isinstance(text, str) or not text:
            raise ConfigError(f"--prompts {p} line {n} has no 'prompt', 'text' or user "
                              "message; add one.")
        out.append(text)
    if not out:
        raise ConfigError(f"--prompts {p} holds no prompt; write one per line.")
    return out


def score_prompts(model_ref: str, prompts: list[str], log_path: Path, embed=None,
                  max_tokens: int = 64, batch: int = 8) -> int:
    """Answer ``prompts`` with the model and write a request log of them at ``log_path``
    (prompt embeddings with ``embed``, as MiniLM's); returns the rows written."""
    from slmkit.engine import Engine, SamplingParams
    from slmkit.engine.generate import encode_prompt
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
            handles = [engine.submit(encode_prompt(tok, p, chat=chat), params) for p in prompts]
            for p, h in zip(prompts, handles):
                c = h.result()
                conf = summarize(c.confidence, c.text, flag, question=p if chat else "",
                                 hidden=c.hidden_mean, probe=probe)
                log.record(answer_row(model_ref, "chat" if chat else "completions", c,
                                      c.finish_reason, conf), prompt=p, answer=c.text)
        log.flush()
    finally:
        log.close()
    return len(prompts)
