"""Cheap prompt descriptors for drift: a language label (code, a script, or a Latin language).

:func:`language` is a small rule set, not a language identifier model: ``code`` when the
text looks like source code, otherwise the dominant Unicode script (``cjk``, ``cyrillic``,
``arabic``, ...) and, for Latin script, the language whose most frequent function words
are most common in it (``en``, ``de``, ``fr``, ``es``, ``it``, ``pt``, ``nl``; ``latin``
when none is). Enough to see a stream change language or turn from prose to code.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_WORDS = {
    "en": "the of and to in is that for it with as was on are be this by not or from",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine",
    "fr": "de la le et les des en du un une est que pour dans qui par sur pas au",
    "es": "de la que el en y los del se las por un para con una su al lo como más",
    "it": "di e il la che in per un del della è non una sono le si con da al",
    "pt": "de a o que e do da em um para é com não uma os no se na por mais",
    "nl": "de en van het een in is dat op te zijn met voor die niet aan er",
}
_VOCAB = {lang: set(words.split()) for lang, words in _WORDS.items()}
_CODE = re.compile(r"(^\s*(def|class|import|from|return|if|for|while|elif|else:|try:|except|"
                   r"with|#include|function|var|let|const|public|private)\b)|[{};]\s*$|"
                   r"^\s*[@#]|==|!=|->|=>|\w\(.*\)|^\s{4,}\S", re.M)
_SCRIPTS = (("cjk", ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")), ("cyrillic", ("CYRILLIC",)),
            ("arabic", ("ARABIC",)), ("hebrew", ("HEBREW",)), ("greek", ("GREEK",)),
            ("devanagari", ("DEVANAGARI",)), ("thai", ("THAI",)), ("latin", ("LATIN",)))


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for label, keys in _SCRIPTS:
        if any(name.startswith(k) for k in keys):
            return label
    return "other"


def language(text: str) -> str:
    """``code``, a script name, or a Latin-script language code (see the module doc)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and sum(bool(_CODE.search(ln)) for ln in lines) >= max(1, 0.5 * len(lines)):
        return "code"
    scripts = Counter(_script(ch) for ch in text[:2000] if ch.isalpha())
    if not scripts:
        return "none"
    script = scripts.most_common(1)[0][0]
    if script != "latin":
        return script
    words = re.findall(r"[^\W\d_]+", text[:2000].lower())
    hits = {lang: sum(w in vocab for w in words) for lang, vocab in _VOCAB.items()}
    best = max(hits, key=hits.get)
    return best if words and hits[best] >= max(2, 0.15 * len(words)) else "latin"


def read_prompts(path: str, flag: str, least: int = 1) -> list[dict]:
    """The prompts of a text file (one per line) or JSONL (a ``prompt`` or ``text`` field,
    or ``messages``): ``{"text", "messages"}`` each, ``text`` as the request log holds a
    prompt (a chat's messages joined by lines, as the server logs them), ``messages`` the
    chat's (else None). ``flag`` names the option in errors; at least ``least`` prompts."""
    import json
    from pathlib import Path

    from slmkit.errors import ConfigError

    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read {flag} {p} ({e}); pass a UTF-8 text or JSONL file "
                          "of prompts.") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append({"text": line, "messages": None})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{flag} {p} line {n} is not JSON; write one object per line "
                              "with a 'prompt', 'text' or 'messages' field.") from None
        obj = obj if isinstance(obj, dict) else {}
        text, messages = obj.get("prompt") or obj.get("text"), obj.get("messages")
        if text is None and isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            text = "\n".join(m["content"] for m in messages)
        else:
            messages = None
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{flag} {p} line {n} has no 'prompt', 'text' or 'messages'; "
                              "add one.")
        out.append({"text": text, "messages": messages})
    if len(out) < least:
        raise ConfigError(f"{flag} {p} has {len(out)} prompts; give at least {least}.")
    return out

