"""What slmkit knows about each architecture, in one table keyed by Hugging Face ``model_type``.

Compression, export and the engine are generic over architectures (they find linears by
name), but a few facts differ per family: whether the decoder is the Llama layout the
engine's fast path, ONNX export and structured pruning walk; the RMSNorm class the engine
fuses; llama.cpp's name for the architecture and its RoPE row order; which layers a
sliding window covers; GPT-2's transposed ``Conv1D`` linears; AWQ's foldable
norm -> projection pairs. They live in :data:`ARCHS`, and every consumer reads them here,
so supporting a new family is adding a row. Facts every config states the same way
(context length, head layout) are read by the functions below, in one fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

#: AWQ entries ``(producer, consumers)``, names relative to one decoder block: the norm or
#: linear whose output feeds the consumers, where AWQ folds its ``1/s``.
_LLAMA_ATTN = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
)
_LLAMA_MLP = (
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
#: Gemma 2 / 3: ``post_attention_layernorm`` normalizes the attention *output* (it feeds the
#: residual stream, not a linear); ``pre_feedforward_layernorm`` feeds the MLP.
_GEMMA_MLP = (
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
#: Phi-3: fused q/k/v and gate/up linears (gate_up's output is split, so nothing folds
#: into down_proj).
_PHI3 = (
    ("input_layernorm", ("self_attn.qkv_proj",)),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
)
#: GPT-NeoX (Pythia): LayerNorms with a bias (both fold), fused query_key_value.
_NEOX = (
    ("input_layernorm", ("attention.query_key_value",)),
    ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
)


@dataclass(frozen=True)
class Arch:
    """The facts of one ``model_type`` (the defaults: nothing special is known).

    Attributes:
        llama_layout: ``model.model.layers[i]`` is (RMSNorm, q/k/v/o attention with RoPE,
            RMSNorm, gate/up/down SiLU MLP), with ``embed_tokens``, ``norm`` and
            ``rotary_emb`` beside the layers: the engine's fast path, ONNX export and
            structured pruning support exactly these.
        rms_norm: class name of the family's RMSNorm (the engine's fused and native norms).
        gguf_arch: llama.cpp's architecture for GGUF export (None: not exported).
        gguf_permute_qk: permute Q/K rows on GGUF export (llama.cpp's ``llama`` rotates
            interleaved pairs, Hugging Face the two halves of a head).
        window_all_layers: ``sliding_window`` covers every layer when the config lists no
            ``layer_types`` (Mistral, Mixtral, Phi-3).
        conv1d: the linears are GPT-2 ``Conv1D`` (weights stored ``[in, out]``).
        awq: AWQ folding entries ``(producer, consumers)`` of one decoder block (Mixtral's
            experts are fused 3-D tensors, not linears, so only its attention is listed).
        norm_offset: the family's RMSNorm computes ``x_hat * (offset + w)`` (Gemma: 1), so
            a scale folded into it divides ``offset + w``, not ``w``.
        fast_decode: the engine's family decoder (:mod:`slmkit.engine.families`) runs it on
            a static KV cache: Llama-like blocks with q/k norms (Qwen3, Gemma 3), sandwich
            norms and soft-capping (Gemma 2/3), fused q/k/v (Phi-3), Granite's multipliers,
            MoE blocks (Mixtral, Qwen2-MoE). ``llama_layout`` families run the original
            fast path (and its native step).
        moe: the MLP is a mixture of experts whose weights are fused 3-D tensors (not
            linears), which the linear-wise compressors leave dense.
    """

    llama_layout: bool = False
    rms_norm: str | None = None
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False
    window_all_layers: bool = False
    conv1d: bool = False
    awq: tuple[tuple[str, tuple[str, ...]], ...] = ()
    norm_offset: float = 0.0
    fast_decode: bool = False
    moe: bool = False


#: model_type -> its facts.
ARCHS: dict[str, Arch] = {
    "llama": Arch(llama_layout=True, rms_norm="LlamaRMSNorm", gguf_arch="llama",
                  gguf_permute_qk=True, awq=_LLAMA_ATTN + _LLAMA_MLP),
    "mistral": Arch(llama_layout=True, rms_norm="MistralRMSNorm", gguf_arch="llama",
                    gguf_permute_qk=True, window_all_layers=True, awq=_LLAMA_ATTN + _LLAMA_MLP),
    "qwen2": Arch(llama_layout=True, rms_norm="Qwen2RMSNorm", gguf_arch="qwen2",
                  awq=_LLAMA_ATTN + _LLAMA_MLP),
    "mixtral": Arch(rms_norm="MixtralRMSNorm", gguf_arch="llama", gguf_permute_qk=True,
                    awq=_LLAMA_ATTN, fast_decode=True, moe=True, window_all_layers=True),
    "gpt2": Arch(conv1d=True),
    "qwen3": Arch(rms_norm="Qwen3RMSNorm", gguf_arch="qwen3", fast_decode=True,
                  awq=_LLAMA_ATTN + _LLAMA_MLP),
    "granite": Arch(rms_norm="GraniteRMSNorm", gguf_arch="granite", gguf_permute_qk=True,
                    fast_decode=True, awq=_LLAMA_ATTN + _LLAMA_MLP),
    "gemma2": Arch(rms_norm="Gemma2RMSNorm", gguf_arch="gemma2", norm_offset=1.0, fast_decode=True,
                   awq=_LLAMA_ATTN + _GEMMA_MLP),
    "gemma3_text": Arch(rms_norm="Gemma3RMSNorm", gguf_arch="gemma3", norm_offset=1.0,
                        fast_decode=True, awq=_LLAMA_ATTN + _GEMMA_MLP),
    "phi3": Arch(rms_norm="Phi3RMSNorm", gguf_arch="phi3", fast_decode=True, awq=_PHI3,
                 window_all_layers=True),
    "gpt_neox": Arch(awq=_NEOX),
    "qwen2_moe": Arch(rms_norm="Qwen2MoeRMSNorm", gguf_arch="qwen2moe", awq=_LLAMA_ATTN,
                      fast_decode=True, moe=True),
}

#: Families whose code ships with the checkpoint (``auto_map``) and that transformers has
#: no class for: slmkit never runs remote code, so these are refused at load time.
REMOTE_CODE_ONLY = {"openelm": "OpenELM"}

#: RMSNorm classes of the Llama-layout families (fused to one ``F.rms_norm``, run natively).
RMS_NORMS = frozenset(a.rms_norm for a in ARCHS.values() if a.llama_layout)

#: RMSNorm classes the native decode step computes (``w * x_hat``: no offset).
NATIVE_RMS_NORMS = frozenset(a.rms_norm for a in ARCHS.values()
                             if a.rms_norm and not a.norm_offset)

#: RMSNorm classes that compute ``x_hat * (offset + w)`` with a non-zero offset (Gemma).
NORM_OFFSETS = {a.rms_norm: a.norm_offset for a in ARCHS.values() if a.norm_offset}

#: Encoder-only families whose "causal" head only exists when the config says is_decoder.
ENCODER_ONLY = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "ernie", "camembert",
    "bert-generation", "data2vec-text", "rembert", "roc_bert", "megatron-bert", "big_bird",
    "roformer", "xmod", "nezha", "modernbert", "distilbert", "albert", "deberta", "deberta-v2",
})

#: Config fields that hold the context length, in the order they are read.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def arch_of(model_type: str | None) -> Arch:
    """The facts of ``model_type`` (a default :class:`Arch` for a family not in the table)."""
    return ARCHS.get(model_type or "", Arch())


def supporting(fact: str) -> tuple[str, ...]:
    """The model types whose ``fact`` (an :class:`Arch` field) is set, sorted: the list an
    error message offers, e.g. ``supporting("llama_layout")``."""
    return tuple(sorted(t for t, a in ARCHS.items() if getattr(a, fact)))


def context_length(config) -> int | None:
    """The model's maximum context (positions) from its config, when it declares one:
    the first positive integer among ``max_position_embeddings``, ``n_positions``,
    ``max_seq_len`` and ``seq_length``."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def head_dim(config) -> int:
    """Channels per attention head: the config's ``head_dim``, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    """Key/value heads (grouped-query attention), the query heads when the config has none."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
