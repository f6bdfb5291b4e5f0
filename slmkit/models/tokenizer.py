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
