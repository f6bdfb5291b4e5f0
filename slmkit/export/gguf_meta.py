"""GGUF metadata: per-architecture hyperparameters, tensor names and tokenizer fields.

The facts here are llama.cpp's conventions (``llama-arch.cpp``, ``llama-vocab.cpp``); the
per-architecture ones are columns of :data:`slmkit.models.arch.ARCHS` (``gguf_arch``,
``gguf_permute_qk``), so that adding an architecture is adding a row there:

* Llama and Mistral are written as llama.cpp's ``llama`` architecture; Qwen2 as ``qwen2``.
* llama.cpp's ``llama`` architecture applies RoPE to *interleaved* pairs (GPT-J style), while
  Hugging Face Llama rotates the two *halves* of each head (GPT-NeoX style). The Q and K
  projection rows are therefore permuted on export (:func:`permute_rope_rows`). ``qwen2``
  uses NeoX-style RoPE in llama.cpp, so its rows are written as they are.
* Qwen3, Phi-3, Gemma 2 and Gemma 3 are written as llama.cpp's ``qwen3``, ``phi3``,
  ``gemma2`` and ``gemma3`` (NeoX RoPE, no permutation). Gemma's RMSNorm weights are stored
  as ``1 + w`` (llama.cpp multiplies by the weight alone). Where llama.cpp's graph fixes a
  fact the config could set otherwise (Gemma's query scale, Gemma 3's one-global-in-six
  layer pattern and local RoPE base), a config that differs is refused
  (:func:`check_faithful`) instead of being written into a file that would run differently.
* Byte-level BPE tokenizers are written as tokenizer model ``gpt2`` with a pre-tokenizer name
  from :data:`PRE_TOKENIZERS`; llama.cpp refuses a file whose pre-tokenizer name it does not
  know, so an unrecognised tokenizer is refused here instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.errors import ConfigError
from slmkit.models.arch import arch_of, head_dim, kv_heads, supporting
from slmkit.models.arch import context_length as max_positions

#: Pre-tokenizer regexes llama.cpp knows (``llama-vocab.cpp``), by the name it expects.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"llama-bpe": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}

# llama.cpp token types (gguf.TokenType values; BYTE marks a SentencePiece byte-fallback
# piece ``<0xNN>``: padding ids must not be BYTE, or they detokenize as stray bytes).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_architecture(config, model_ref: str) -> tuple[str, bool]:
    """``(llama.cpp arch name, permute Q/K rows)`` for a HF config, or a clear refusal."""
    kind = getattr(config, "model_type", "?")
    facts = arch_of(kind)
    onnx = "export it with --format onnx" if facts.llama_layout else \
        "slm generate / slm serve run it as it is"
    if facts.gguf_arch is None:
        known = ", ".join(supporting("gguf_arch"))
        raise ConfigError(f"'{model_ref}' is a '{kind}' model, which GGUF export does not "
                          f"support yet (supported: {known}); {onnx}.")
    if getattr(config, "num_local_experts", 0) and not facts.moe:
        raise ConfigError(f"'{model_ref}' is a '{kind}' mixture-of-experts model, which GGUF "
                          f"export does not support yet; {onnx}.")
    rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"'{model_ref}' uses RoPE scaling '{rope_type}', which GGUF export "
                          "does not write yet; only default and linear RoPE are supported.")
    check_faithful(config, facts.gguf_arch, model_ref)
    return facts.gguf_arch, facts.gguf_permute_qk


def _rope(config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters (of ``layer_type``'s layers where they differ per type: Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


#: Layers llama.cpp's graph makes sliding-window ones: Gemma 2 every other layer from the
#: first, Gemma 3 five in six (``hparams.set_swa_pattern``); the rest are global.
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
#: Block counts llama.cpp takes for the 27B models, whose query scale is hidden / heads.
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def llamacpp_query_scalar(arch: str, n_blocks: int, hidden: int, heads: int,
                          hd: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's Gemma graph uses (it is not in the file):
    hidden / heads for the 27B models, the head dim otherwise."""
    return hidden // heads if n_blocks == _GEMMA_27B_BLOCKS.get(arch) else hd


def llamacpp_layer_types(arch: str, n_blocks: int) -> list[str]:
    period = _SWA_PERIOD[arch]
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
            for i in range(n_blocks)]


def check_faithful(config, arch: str, model_ref: str) -> None:
    """Refuse a config whose behaviour llama.cpp's graph for ``arch`` would not reproduce."""
    if arch == "qwen2moe":
        # llama.cpp's qwen2moe graph: a mixture in every block, weights not renormalised
        # over the top k
        if getattr(config, "norm_topk_prob", False):
            raise ConfigError(f"'{model_ref}' is a 'qwen2_moe' model that renormalises its "
                              "experts' weights (norm_topk_prob), which llama.cpp's qwen2moe "
                              "graph does not; GGUF export cannot keep its behaviour.")
        if getattr(config, "mlp_only_layers", None) or \
                getattr(config, "decoder_sparse_step", 1) != 1:
            raise ConfigError(f"'{model_ref}' is a 'qwen2_moe' model with dense MLP blocks "
                              "(mlp_only_layers / decoder_sparse_step), which llama.cpp's "
                              "qwen2moe graph does not have; GGUF export cannot keep its "
                              "behaviour.")
    if arch not in _SWA_PERIOD:
        return
    n, hd = config.num_hidden_layers, head_dim(config)

    def refuse(what: str) -> None:
        raise ConfigError(f"'{model_ref}' is a '{config.model_type}' model that {what}, "
                          f"which llama.cpp's {arch} graph fixes otherwise; GGUF export "
                          "cannot keep its behaviour.")

    scalar = llamacpp_query_scalar(arch, n, config.hidden_size, config.num_attention_heads, hd)
    if getattr(config, "query_pre_attn_scalar", scalar) != scalar:
        refuse(f"scales queries by 1/sqrt({config.query_pre_attn_scalar}), not "
               f"1/sqrt({scalar})")
    types = getattr(config, "layer_types", None)
    if types is not None and list(types) != llamacpp_layer_types(arch, n):
        refuse(f"has sliding-window layers {list(types)}")
    local = _rope(config, "sliding_attention").get("rope_theta", 10000.0)
    if arch == "gemma3" and float(local) != 10000.0:
        refuse(f"uses a local RoPE base of {local:g}, not 10000")
    if arch == "gemma3" and (getattr(config, "final_logit_softcapping", None)
                             or getattr(config, "attn_logit_softcapping", None)):
        refuse("soft-caps logits")


def _window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    return int(window) if window and getattr(config, "use_sliding_window", True) else None


def context_length(config, arch: str = "llama") -> int:
    """The context to declare: for ``llama`` and ``qwen2``, the sliding window when it is
    shorter than the positions.

    llama.cpp's ``llama`` architecture has no sliding-window attention, so a Mistral model
    behaves the same only within its window; declaring the window keeps users inside it.
    The architectures whose graphs have a window (:data:`_WINDOWED`) declare it instead.
    """
    ctx = int(max_positions(config))
    window = _window(config)
    if window and arch not in _WINDOWED:
        ctx = min(ctx, window)
    return ctx


#: llama.cpp architectures whose graph honours ``{arch}.attention.sliding_window``.
_WINDOWED = ("phi3", "gemma2", "gemma3")
#: The activation each llama.cpp graph computes in its gated MLP.
_ACTIVATIONS = {"gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh"}


def write_hparams(writer, config, arch: str) -> None:
    """The full hyperparameters, under llama.cpp's ``{arch}.*`` keys."""
    import gguf

    hd = head_dim(config)
    writer.add_context_length(context_length(config, arch))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rotary = _rope(config).get("partial_rotary_factor",
                               getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(hd * (rotary or 1.0)))
    if hd != config.hidden_size // config.num_attention_heads or arch in _SWA_PERIOD:
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    if arch in _WINDOWED and _window(config):
        writer.add_sliding_window(_window(config))
    if getattr(config, "num_local_experts", 0):      # Mixtral: llama.cpp's llama graph
        writer.add_expert_count(int(config.num_local_experts))   # with experts, weights
        writer.add_expert_used_count(int(config.num_experts_per_tok))  # renormalised
    if arch == "qwen2moe":
        writer.add_expert_count(int(config.num_experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if arch == "granite":       # llama.cpp's granite graph reads the four multipliers
        writer.add_embedding_scale(float(config.embedding_multiplier))
        writer.add_residual_scale(float(config.residual_multiplier))
        writer.add_attention_scale(float(config.attention_multiplier))
        writer.add_logit_scale(float(config.logits_scaling))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    want = _ACTIVATIONS.get(arch, "silu")
    if act != want:
        raise ConfigError(f"This {arch} model uses activation '{act}', but llama.cpp's graph "
                          f"for it is gated by {want}; GGUF export cannot keep its behaviour.")


def llamacpp_tensor(arch: str, hf_name: str, value):
    """A source tensor as llama.cpp's graph reads it: Gemma's norm weights ``w`` as
    ``1 + w`` (Hugging Face computes ``x_hat * (1 + w)``, llama.cpp ``x_hat * w``)."""
    if arch in _SWA_PERIOD and hf_name.endswith("norm.weight"):
        return value + 1.0
    return value


# ----------------------------------------------------------------------------- tensors

def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K projection rows from NeoX (halves) to GPT-J (interleaved) RoPE pairs.

    Within each head, HF rotates dims ``(i, i + hd/2)`` together; llama.cpp rotates
    ``(2i, 2i + 1)``. Row ``i`` of the first half goes to ``2i``, of the second to ``2i + 1``.

    Args:
        weight: ``[n_heads * hd, ...]`` (a weight ``[out, in]``, a bias ``[out]``, or packed
            quantized rows ``[out, bytes]``: only whole rows move).
        n_heads: heads in this projection (the KV heads for K).
    """
    rows = weight.shape[0]
    hd = rows // n_heads
    rest = weight.shape[1:]
    w = weight.reshape(n_heads, 2, hd // 2, *rest)  # [H, half, hd/2, ...]
    return w.transpose(1, 2).reshape(rows, *rest)   # [H, hd/2, half, ...] -> [H*hd, ...]


def tensor_name_map(arch: str, n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)


def gguf_tensor_name(name_map, hf_name: str) -> str:
    """HF parameter name -> GGUF name (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``)."""
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ConfigError(f"Tensor '{hf_name}' has no GGUF name; this model has parts the "
                          "llama.cpp graph does not know, so it cannot be exported to GGUF.")
    return new


# ----------------------------------------------------------------------------- tokenizer

@dataclass
class TokenizerMeta:
    """What llama.cpp needs to rebuild a byte-level BPE tokenizer."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    chat_template: str | None
    #: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece BPE with byte fallback: pieces
    #: with ``▁`` for a space, a score per piece instead of merges)
    model: str = "gpt2"
    scores: list[float] | None = None
    add_space_prefix: bool = False
    unk_id: int | None = None


def detect_pre_tokenizer(pre: dict | None, model_ref: str) -> str:
    """The llama.cpp pre-tokenizer name for a ``tokenizer.json`` ``pre_tokenizer`` section."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"                  # the GPT-2 regex (slmkit's own tokenizers)
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
                and steps[1].get("use_regex", True):
            return "smollm"             # SmolLM: single digits, then the GPT-2 regex
        split = next((s for s in steps if s.get("type") == "Split"), None)
        if split is not None:
            regex = split.get("pattern", {}).get("Regex")
            for name, known in PRE_TOKENIZERS.items():
                if regex == known:
                    return name
    raise ConfigError(f"'{model_ref}' has a tokenizer whose pre-tokenizer llama.cpp would not "
                      "recognise (it refuses such files); use a byte-level BPE tokenizer with "
                      "the GPT-2, Llama-3 or Qwen2 regex, e.g. one from `slm tokenizer train`.")


def tokenizer_meta(model_dir: Path, tokenizer, vocab_size: int, model_ref: str) -> TokenizerMeta:
    """Read vocab, merges and special tokens from ``tokenizer.json`` for GGUF.

    Token strings are kept in their byte-level form (``Ġ`` for a space), which is what the
    ``gpt2`` tokenizer model in llama.cpp expects. Ids past the tokenizer's vocabulary (a
    config vocab padded to a multiple) are filled with unused ``[PAD{i}]`` tokens.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"'{model_ref}' has no tokenizer.json (a fast byte-level BPE "
                          "tokenizer), which GGUF export needs; re-save the tokenizer.")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"'{model_ref}' has a {model.get('type', '?')} tokenizer; GGUF "
                          "export supports BPE tokenizers (byte-level, or SentencePiece-style "
                          "with byte fallback) only.")
    if model.get("byte_fallback"):
        return _sentencepiece_meta(spec, tokenizer, vocab_size, model_ref)
    pre = detect_pre_tokenizer(spec.get("pre_tokenizer"), model_ref)
    vocab, added = _vocabulary(spec, vocab_size, model_ref)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = NORMAL if t is None else (CONTROL if t.get("special") else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    eot = vocab.get("<|im_end|>")
    return TokenizerMeta(tokens=tokens, types=types, merges=merges, pre=pre,
                         bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id, eot_id=eot, add_bos=add_bos,
                         chat_template=getattr(tokenizer, "chat_template", None))


def _vocabulary(spec: dict, vocab_size: int, model_ref: str) -> tuple[dict[str, int], dict]:
    """``(piece -> id with the added tokens, added token entries by content)`` of a
    ``tokenizer.json``, refused when it has more ids than the embedding has rows."""
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ConfigError(f"'{model_ref}' has a tokenizer of {n} tokens but an embedding of "
                          f"only {vocab_size} rows; the model and tokenizer do not match.")
    return vocab, added


def _sentencepiece_meta(spec: dict, tokenizer, vocab_size: int, model_ref: str) -> TokenizerMeta:
    """A SentencePiece-style BPE (``byte_fallback``: Llama 2, Gemma, Phi-3; what transformers
    converts a ``tokenizer.model`` into) as llama.cpp's ``llama`` tokenizer model.

    llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined
    piece has the highest score; Hugging Face's BPE applies its merges by rank. So a piece's
    score is minus the rank of the first merge that makes it (the converter made the merges
    from SentencePiece's scores in that order); pieces no merge makes score below all.
    ``<0xNN>`` pieces are BYTE, the unknown piece UNKNOWN, added special tokens CONTROL."""
    model = spec["model"]
    norm = json.dumps(spec.get("normalizer") or {})
    pre = spec.get("pre_tokenizer") or {}
    if '"Replace"' not in norm and pre.get("type") != "Metaspace":
        raise ConfigError(f"'{model_ref}' has a SentencePiece-style tokenizer whose text "
                          "preparation llama.cpp would not reproduce (spaces are not replaced "
                          "by '▁'); GGUF export cannot keep its tokenization.")
    # a leading '▁' before the text: Prepend in the normalizer (Llama 2) or Metaspace's
    # prepend scheme (transformers 5), not Gemma's
    space_prefix = '"Prepend"' in norm or (pre.get("type") == "Metaspace" and
                                           pre.get("prepend_scheme", "always") != "never")
    vocab, added = _vocabulary(spec, vocab_size, model_ref)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for i, (a, b) in enumerate(merges):
        rank.setdefault(a + b, i)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    scores = [-1e9] * vocab_size
    unk = model.get("unk_token")
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = BYTE
        elif text == unk:
            types[i] = UNKNOWN
        elif t is not None:
            types[i] = CONTROL if t.get("special") else USER_DEFINED
        else:
            types[i] = NORMAL
        if text in rank:
            scores[i] = -float(rank[text])
        elif len(text) == 1 or types[i] != NORMAL:
            scores[i] = 0.0          # single characters: never made by a merge
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    return TokenizerMeta(tokens=tokens, types=types, merges=[], pre="default",
                         bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id, eot_id=None, add_bos=add_bos,
                         chat_template=getattr(tokenizer, "chat_template", None),
                         model="llama", scores=scores, add_space_prefix=space_prefix,
                         unk_id=vocab.get(unk) if unk else None)


def write_tokenizer(writer, meta: TokenizerMeta) -> None:
    writer.add_tokenizer_model(meta.model)
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    if meta.model == "llama":
        writer.add_token_scores(meta.scores)
        writer.add_add_space_prefix(meta.add_space_prefix)
        if meta.unk_id is not None:
            writer.add_unk_token_id(int(meta.unk_id))
    else:
        writer.add_token_merges(meta.merges)
    for value, add in ((meta.bos_id, writer.add_bos_token_id),
                       (meta.eos_id, writer.add_eos_token_id),
                       (meta.pad_id, writer.add_pad_token_id),
                       (meta.eot_id, writer.add_eot_token_id)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(False)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
