"""Byte-level BPE tokenizer training (Hugging Face ``tokenizers``).

Pre-tokenization is the GPT-2 byte-level regex, so the GGUF export can declare the
``gpt-2`` pre-tokenizer that llama.cpp knows. Any byte sequence round-trips: the base
alphabet is all 256 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

BOS = "<|endoftext|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, PAD, IM_START, IM_END]

#: ChatML, the template most small chat models use; generation stops at <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    show_progress: bool = False):
    """Train a byte-level BPE tokenizer on an iterator of documents.

    Args:
        texts: documents (streamed; never joined into one string).
        vocab_size: total vocabulary including the 256 byte symbols and special tokens.
        min_frequency: minimum pair count for a merge.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slmkit.errors import ConfigError

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"--vocab-size {vocab_size} is too small; byte-level BPE needs at "
                          f"least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes plus special tokens).")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    """Wrap a raw ``tokenizers.Tokenizer`` as a transformers fast tokenizer with our specials."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _batches(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def stdlib_sample(max_files: int = 200, max_bytes: int = 4_000_000) -> Iterator[str]:
    """A small, deterministic sample of the Python standard library's source files.

    For tests and the demo; the full corpus with splits lives in ``slmkit.data``.
    """
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total >= max_bytes:
            break


def bytes_per_token(tokenizer, texts: Iterable[str]) -> dict:
    """Compression of ``tokenizer`` on ``texts``: UTF-8 bytes per token (higher is better).

    Returns:
        ``{"documents", "bytes", "tokens", "bytes_per_token"}``.
    """
    n_docs = n_bytes = n_tokens = 0
    for batch in _batches(texts, 64):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        n_docs += len(batch)
        n_bytes += sum(len(t.encode("utf-8", errors="replace")) for t in batch)
        n_tokens += sum(len(x) for x in ids)
    return {"documents": n_docs, "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": n_bytes / max(n_tokens, 1)}


def train_tokenizer_on_corpus(data, vocab_size: int, out, val_fraction: float = 0.05,
                              min_frequency: int = 2, overwrite: bool = False) -> dict:
    """Train a tokenizer on the train split of a corpus and save it as a HF tokenizer dir.

    Only training documents are seen during training; compression (bytes per token) is
    measured on the validation split, so the figure is not flattered by memorised merges.

    Args:
        data: corpus spec (see :func:`slmkit.data.corpus.iter_documents`).
        vocab_size: total vocabulary size.
        out: output directory (written atomically; must not exist unless ``overwrite``).
        val_fraction: share of documents held out for the compression figure.

    Returns:
        A dict of results: ``out``, ``vocab_size``, ``train`` (a ``CorpusStats``), and the
        validation ``bytes_per_token`` figures (empty when the split has no documents).
    """
    from slmkit.console import track
    from slmkit.data.corpus import CorpusStats, iter_documents
    from slmkit.models.io import atomic_dir, prepare_out_dir
    from slmkit.models.lineage import make_record, write_record

    prepare_out_dir(out, overwrite)[1].rmdir()   # fail fast on a bad --out, before training
    stats = CorpusStats()
    docs = (d.text for d in track(iter_documents(data, "train", val_fraction, stats=stats),
                                  "reading corpus"))
    tok = train_tokenizer(docs, vocab_size=vocab_size, min_frequency=min_frequency)
    val_texts = (d.text for d in iter_documents(data, "val", val_fraction))
    val = bytes_per_token(tok, val_texts) if val_fraction > 0 else {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tok.save_pretrained(tmp)
        params = {"data": data, "vocab_size": vocab_size, "val_fraction": val_fraction,
                  "min_frequency": min_frequency}
        write_record(tmp, make_record("tokenizer", params, {
            "vocab_size": len(tok), "val_bytes_per_token": val.get("bytes_per_token"),
            "train_documents": stats.yielded, "train_bytes": stats.bytes}, []))
    return {"out": str(out), "vocab_size": len(tok), "train": stats, "val": val}


# --------------------------------------------------------------------------- the `tokenizer` step

from pydantic import Field  # noqa: E402

from slmkit.step import CORPUS_HELP, Corpus, StepConfig, StepResult, cli  # noqa: E402


class TokenizerConfig(StepConfig):
    """Options of ``slm tokenizer train`` and the ``tokenizer`` recipe step."""

    data: Corpus = Field(default="stdlib", description=CORPUS_HELP,
                         json_schema_extra=cli(short="-d"))
    vocab_size: int = Field(default=8192, ge=300, description="Total vocabulary size.")
    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of documents "
                                "held out to measure bytes per token.")
    min_frequency: int = Field(default=2, ge=1, description="Minimum pair count for a merge.")


def run_tokenizer(cfg: TokenizerConfig) -> StepResult:
    """Train a byte-level BPE tokenizer on ``cfg.data`` into ``cfg.out``."""
    res = train_tokenizer_on_corpus(cfg.data, cfg.vocab_size, cfg.output(),
                                    val_fraction=cfg.val_fraction,
                                    min_frequency=cfg.min_frequency, overwrite=cfg.overwrite)
    val = res["val"]
    figures = {"vocab_size": res["vocab_size"]}
    rows = [("vocabulary", res["vocab_size"]), *res["train"].summary_rows()]
    if val:
        figures["val_bytes_per_token"] = val["bytes_per_token"]
        rows.append(("val bytes/token", f"{val['bytes_per_token']:.3f}  ({val['documents']:,} "
                                        f"docs, {val['tokens']:,} tokens)"))
    rows.append(("written to", res["out"]))
    return StepResult("tokenizer train", res["out"], figures, rows)
