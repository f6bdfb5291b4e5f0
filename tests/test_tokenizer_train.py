"""Tokenizer training: round trips of arbitrary text and bytes, specials, the CLI verb."""

from __future__ import annotations

import json
import random

import pytest

from slmkit.models.tokenizer import bytes_per_token, train_tokenizer_on_corpus


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF),
              (0x590, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0300, 0x036F), (0xE000, 0xF8FF),
              (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:   # lone surrogates are not valid text
            cp = 0xFFFD
        out.append(chr(cp))
    return "".join(out)


def test_round_trips_arbitrary_unicode(tokenizer):
    rng = random.Random(0)
    samples = [_random_unicode(rng, rng.randint(1, 200)) for _ in range(200)]
    samples += ["", " ", "\n\n\t  ", "naïve café", "日本語のテキスト", "👩‍👩‍👧‍👦 family",
                "e\u0301 combining", "\x00\x01\x7f control", "  leading and trailing  ",
                "<|im_start|>user\nhi<|im_end|>\n"]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_round_trips_arbitrary_bytes(tokenizer):
    """Every byte value is a base symbol: any byte string maps to tokens and back exactly."""
    from tokenizers.pre_tokenizers import ByteLevel

    backend = tokenizer.backend_tokenizer
    # The byte-level alphabet maps each of the 256 bytes to one printable symbol in vocab.

    symbols = ByteLevel.alphabet()
    assert len(symbols) == 256 and all(s in tokenizer.get_vocab() for s in symbols)
    rng = random.Random(1)
    for _ in range(50):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        text = raw.decode("latin-1")          # arbitrary bytes as code points 0..255
        ids = backend.encode(text, add_special_tokens=False).ids
        assert backend.decode(ids, skip_special_tokens=False) == text
        utf8 = raw.decode("utf-8", errors="replace")
        assert tokenizer.decode(tokenizer(utf8, add_special_tokens=False)["input_ids"]) == utf8


def test_specials_and_chat_template(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1


def test_train_on_corpus_reports_val_compression(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"def function_{i}(x):\n    return x * {i} + {i * i}\n"} for i in range(300)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train_tokenizer_on_corpus(str(data), 400, tmp_path / "tok", val_fraction=0.2)
    assert res["vocab_size"] <= 400 and res["val"]["documents"] > 20
    assert res["train"].yielded + res["val"]["documents"] == 300
    assert 1.5 < res["val"]["bytes_per_token"] < 20
    record = json.loads((tmp_path / "tok" / "slmkit.json").read_text())
    assert record["step"] == "tokenizer"
    from slmkit.models import load_tokenizer

    tok = load_tokenizer(tmp_path / "tok")
    again = bytes_per_token(tok, [r["text"] for r in rows[:5]])
    assert again["tokens"] < again["bytes"]


@pytest.mark.slow
def test_cli_tokenizer_train(cli, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"text number {i}, café ✓ " * 20)
    (corpus / "blob.bin").write_bytes(b"\x00\x01" * 100)
    r = cli("tokenizer", "train", "--data", str(corpus), "--vocab-size", "300",
            "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    assert "val bytes/token" in r.stdout and "skipped (binary)" in r.stdout
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    bad = cli("tokenizer", "train", "--data", str(tmp_path / "none*.txt"), "--out",
              tmp_path / "tok2")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: The glob")
    assert not (tmp_path / "tok2").exists()
    small = cli("tokenizer", "train", "--data", str(corpus), "--vocab-size", "100",
                "--out", tmp_path / "tok3")
    assert small.returncode == 2 and "Invalid --vocab-size" in small.stderr
    assert not (tmp_path / "tok3").exists() and not list(tmp_path.glob(".tok3*"))
