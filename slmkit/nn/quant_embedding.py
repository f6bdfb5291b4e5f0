"""``QuantEmbedding``: a drop-in ``nn.Embedding`` whose table is stored int8 / packed int4.

An embedding table ``[vocab, hidden]`` has the same layout as a linear layer's weight
``[out, in]``, so the storage is exactly :class:`~slmkit.nn.quant_linear.QuantLinear`'s
(``qweight``, ``scales``, optional ``zeros``; groups run along the hidden dimension). Only
``forward`` differs: it gathers the rows of the requested token ids and dequantizes just
those rows, ``[..., hidden]``, so a lookup never materializes the whole dense table.

Because the layout is shared, a GGUF export writes the table with the same block encoder
as any quantized linear (``token_embd`` in Q8_0 / Q4_0 / Q4_1).
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.nn.packing import dequantize_codes, pack_codes, quantize_rtn, unpack_codes
from slmkit.nn.quant_linear import QuantLinear


class QuantEmbedding(QuantLinear):
    """Weight-only quantized token embedding (replaces one ``nn.Embedding``).

    Args:
        num_embeddings: vocabulary rows.
        embedding_dim: hidden size (the quantization groups run along it).
        bits, group_size, sym: the grid, as :class:`QuantLinear`.
        padding_idx: kept for :meth:`to_dense` (the row itself is stored like any other).
        dtype: dtype of the rows ``forward`` returns.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 sym: bool, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None, embed_scale: float = 1.0):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, sym, dtype=dtype,
                         device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        #: the factor a scaled embedding multiplies its rows by (Gemma: sqrt(hidden)); not
        #: stored in the checkpoint, the model's config implies it
        self.embed_scale = float(embed_scale)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int,
                       sym: bool) -> QuantEmbedding:
        """Round-to-nearest quantization of an ``nn.Embedding``'s table, row by row.

        Embeddings see no input activations (a lookup is not a matmul), so calibration
        based methods (GPTQ, AWQ) have nothing to weigh the error by: RTN is the method.
        """
        w = emb.weight.detach().float()                                  # [V, D]
        codes, scale, zero = quantize_rtn(w, bits, group_size, sym)
        layer = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, sym,
                    padding_idx=emb.padding_idx, dtype=emb.weight.dtype, device=w.device,
                    embed_scale=embedding_scale(emb))
        layer.qweight.copy_(pack_codes(codes, bits))
        layer.scales.copy_(scale.to(torch.float16))
        if not sym:
            layer.zeros.copy_(zero.to(torch.uint8))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids``: ``[...]`` int64 -> ``[..., hidden]`` rows in the layer's dtype."""
        flat = ids.reshape(-1)                                           # [N]
        q = self.qweight.index_select(0, flat)                           # [N, packed D]
        codes = unpack_codes(q, self.bits, self.embedding_dim)          # [N, D]
        scale = self.scales.index_select(0, flat)                        # [N, G]
        zero = (self.zeros.index_select(0, flat).float() if not self.sym else
                torch.full(scale.shape, 2.0 ** (self.bits - 1), device=scale.device))
        rows = dequantize_codes(codes, scale, zero, self.group_size, self.out_dtype)
        if self.embed_scale != 1.0:   # as transformers: rows * scale in the rows' dtype
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)             # [..., D]

    def to_dense(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the dequantized table (a :class:`ScaledEmbedding`
        when the rows are scaled)."""
        kind = nn.Embedding if self.embed_scale == 1.0 else ScaledEmbedding
        extra = {} if kind is nn.Embedding else {"embed_scale": self.embed_scale}
        emb = kind(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                   dtype=self.out_dtype, device=self.qweight.device, **extra)
        emb.weight.data.copy_(self.dequantize_weight(self.out_dtype))
        return emb

    def as_linear(self) -> QuantLinear:
        """A ``QuantLinear`` LM head with the same codes (for a tied ``lm_head``)."""
        head = QuantLinear(self.in_features, self.out_features, self.bits, self.group_size,
                           self.sym, dtype=self.out_dtype, device=self.qweight.device)
        head.load_state_dict(self.state_dict(), strict=True)
        return head

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}")


def embedding_scale(emb: nn.Module) -> float:
    """The factor a scaled word embedding multiplies its rows by (transformers' Gemma,
    Gemma 2/3 ``*ScaledWordEmbedding``: ``scalar_embed_scale``), 1.0 for a plain one."""
    return float(getattr(emb, "scalar_embed_scale", 1.0) or 1.0)


class ScaledEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows are multiplied by ``embed_scale`` (Gemma's sqrt(hidden)),
    as transformers' scaled word embeddings compute it; the state dict is the plain table."""

    def __init__(self, *args, embed_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scalar_embed_scale = float(embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows * torch.tensor(self.scalar_embed_scale, dtype=self.weight.dtype)
