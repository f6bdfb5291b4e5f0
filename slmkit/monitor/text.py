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
