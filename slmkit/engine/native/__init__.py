"""The native decode step: ``decode.c`` compiled on first use, called through ctypes.

:class:`NativeStep` runs one decode token for each of ``B`` rows through a Llama-family
model (fp32 activations; fp32, int8 or int4 ``QuantLinear`` weights) in a single C call,
reading the weights in place from the tensors torch holds and writing keys/values into the
same :class:`~slmkit.engine.cache.KVCache` the torch path uses, so prefill (torch) and decode
(native) interleave freely. :func:`build_reason` says why a model cannot take this path;
the runner then keeps its torch loop, which computes the same function.

The library is built with the system C compiler (``cc -O3 -march=native -fopenmp``, about
a second) into ``$SLMKIT_CACHE_DIR/native`` (default ``~/.cache/slmkit/native``), keyed by
the source, the compiler and the CPU flags, and reused after that. No compiler, a failed
build or ``SLMKIT_NATIVE=0`` leave the torch path in charge.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from slmkit.models import arch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
LIN_F32, LIN_Q8, LIN_Q4 = 0, 1, 2
QBLOCK = 32
MAX_HEAD_DIM = 512


class Lin(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("group", ctypes.c_int32), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("pw", ctypes.c_void_p), ("psc", ctypes.c_void_p), ("pzf", ctypes.c_void_p),
                ("inv_in", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("qkv", Lin * 3),
                ("n_qkv", ctypes.c_int32), ("o", Lin), ("gu", Lin * 2), ("n_gu", ctypes.c_int32),
                ("down", Lin), ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p),
                ("window", ctypes.c_int32), ("ks", ctypes.c_void_p), ("vs", ctypes.c_void_p),
                ("qn", ctypes.c_void_p), ("kn", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin_signed", ctypes.c_void_p),
                ("norm_ao", ctypes.c_void_p), ("norm_mo", ctypes.c_void_p),
                ("rows", ctypes.c_int32),
                ("n_exp", ctypes.c_int32), ("top_k", ctypes.c_int32),
                ("norm_topk", ctypes.c_int32), ("moe_inter", ctypes.c_int32),
                ("router", ctypes.c_void_p), ("exp_lin", ctypes.c_void_p),
                ("shared_gate", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("hidden", ctypes.c_int32),
                ("n_heads", ctypes.c_int32), ("n_kv", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("max_seq", ctypes.c_int32),
                ("n_threads", ctypes.c_int32), ("eps", ctypes.c_float),
                ("attn_scale", ctypes.c_float), ("cos", ctypes.c_void_p),
                ("sin_signed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("layers", ctypes.POINTER(Layer)), ("lm_head", Lin), ("kv_kind", ctypes.c_int32),
                ("resid_mult", ctypes.c_float), ("act", ctypes.c_int32),
                ("attn_softcap", ctypes.c_float), ("rot", ctypes.c_int32),
                ("tap_after", ctypes.c_int32), ("tap", ctypes.c_void_p)]


#: decode.c's KV cache kinds (model_t.kv_kind), by the cache's torch dtype
KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


_LIB: dict = {}
_ENABLED = {"on": True}


def set_enabled(on: bool) -> None:
    """Turn the native step on or off for runners built from now on (benchmarks compare)."""
    _ENABLED["on"] = bool(on)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("SLMKIT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "slmkit")
    return Path(root) / "native"


def load_library():
    """The compiled library (a ``ctypes.CDLL``), or None with the reason logged once."""
    if "lib" in _LIB:
        return _LIB["lib"]
    _LIB["lib"], _LIB["reason"] = None, None
    if os.environ.get("SLMKIT_NATIVE", "1") == "0":
        _LIB["reason"] = "SLMKIT_NATIVE=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _LIB["reason"] = "no C compiler found"
        log.info("native decode step unavailable: %s", _LIB["reason"])
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags),
                                        _cpu_flags()]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"slmdecode-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_so = Path(tmp) / out.name
                res = subprocess.run([cc, *flags, "-o", str(tmp_so), str(SOURCE), "-lm"],
                                     capture_output=True, text=True, timeout=300)
                if res.returncode != 0:
                    raise OSError(res.stderr.strip().splitlines()[-1] if res.stderr else
                                  f"{cc} exited {res.returncode}")
                os.replace(tmp_so, out)  # atomic: concurrent builders never see half a file
            for stale in out.parent.glob("slmdecode-*.so"):   # builds of older sources
                if stale != out:
                    stale.unlink(missing_ok=True)  # a process that has it loaded keeps its map
        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as e:
        _LIB["reason"] = f"build failed: {e}"
        log.warning("native decode step unavailable (%s); using the torch path", e)
        return None
    lib.slm_decode.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p]
    lib.slm_decode.restype = ctypes.c_int
    lib.slm_prefill.argtypes = lib.slm_decode.argtypes
    lib.slm_prefill.restype = ctypes.c_int
    lib.slm_verify.argtypes = lib.slm_decode.argtypes
    lib.slm_verify.restype = ctypes.c_int
    lib.slm_work_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int]
    lib.slm_work_floats.restype = ctypes.c_int64
    lib.slm_has_vnni.restype = ctypes.c_int
    lib.slm_linear.argtypes = [ctypes.POINTER(Lin), ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.slm_linear.restype = ctypes.c_int
    lib.slm_linear_work_floats.argtypes = [ctypes.POINTER(Lin), ctypes.c_int, ctypes.c_int]
    lib.slm_linear_work_floats.restype = ctypes.c_int64
    lib.slm_argmax.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.slm_argmax.restype = None
    lib.slm_mask_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_int]
    lib.slm_mask_rows.restype = None
    lib.slm_confidence.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.slm_confidence.restype = None
    lib.slm_embed_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + \
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.slm_embed_rows.restype = ctypes.c_int
    _LIB["lib"] = lib
    return lib


def unavailable_reason() -> str | None:
    """Why :func:`load_library` returned None (None when it did not)."""
    load_library()
    return _LIB.get("reason")


# --------------------------------------------------------------------------- model mapping


def _ptr(t: torch.Tensor | None, keep: list) -> int | None:
    if t is None:
        return None
    keep.append(t)
    return t.data_ptr()


def _quant_reason(module, vnni: bool) -> str | None:
    """Why ``module`` has no integer kernel (it is no ``QuantLinear``, or one of a kind the
    kernels do not cover), or None when it has one."""
    from slmkit.nn.quant_linear import QuantLinear

    if not (isinstance(module, QuantLinear) and type(module).__name__ == "QuantLinear"):
        return "not a QuantLinear"
    if module.bits not in (8, 4):
        return f"{module.bits}-bit layers have no native kernel"
    if not vnni:
        return "this CPU has no AVX-512 VNNI for the integer kernels"
    k = module.in_features
    group = k if module.group_size == -1 else module.group_size
    if group % QBLOCK or k % group:
        return f"group size {module.group_size} / width {k} do not fit 32-column blocks"
    if module.qweight.device.type != "cpu":
        return "quantized weights are not on the CPU"
    return None


def _lin(module, keep: list, vnni: bool, fused: tuple | None = None,
         used: list | None = None) -> Lin | str:
    """A :class:`Lin` for a linear module (or a fused ``(weight, bias)``), or why not.

    ``used``: a dry run, which only checks (no panels are built) and lists the modules."""
    from torch import nn

    from slmkit.nn.quant_linear import QuantLinear

    if fused is not None or type(module) is nn.Linear:
        weight, bias = fused if fused is not None else (module.weight, module.bias)
        if weight.dtype != torch.float32 or weight.device.type != "cpu" \
                or not weight.is_contiguous():
            return "a linear weight is not contiguous fp32 on the CPU"
        n, k = weight.shape
        if used is not None and fused is None:
            used.append(module)
        return Lin(LIN_F32, n, k, k, _ptr(weight.detach(), keep), None, None,
                   _ptr(None if bias is None else bias.detach().float().contiguous(), keep))
    if isinstance(module, QuantLinear) and type(module).__name__ == "QuantLinear":
        reason = _quant_reason(module, vnni)
        if reason is not None:
            return reason
        k, n = module.in_features, module.out_features
        group = k if module.group_size == -1 else module.group_size
        zeros = None if module.sym else module.zeros.contiguous()
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        if used is not None:
            used.append(module)
            return Lin(LIN_Q8 if module.bits == 8 else LIN_Q4, n, k, group)
        pw, psc, pzf = panels(module)
        inv_in = None   # an AWQ scale kept inside the layer: the kernel reads x / s
        if module.input_scale is not None:
            inv_in = (1.0 / module.input_scale.detach().float()).contiguous()
        return Lin(LIN_Q8 if module.bits == 8 else LIN_Q4, n, k, group,
                   _ptr(module.qweight.contiguous(), keep), _ptr(module.scales.contiguous(), keep),
                   _ptr(zeros, keep), _ptr(bias, keep), _ptr(pw, keep), _ptr(psc, keep),
                   _ptr(pzf, keep), _ptr(inv_in, keep))
    return f"{type(module).__name__} layers have no native kernel"


def panel_bytes(module) -> int:
    """Bytes of :func:`panels`' code tensor for a ``QuantLinear`` (8 or 4 bits)."""
    return (module.out_features + 15) // 16 * 16 * module.in_features * module.bits // 8


def pack_panels(modules) -> None:
    """Build :func:`panels` for the layers that have none yet, all in one buffer backed by
    2 MB pages (:func:`~slmkit.models.memory.huge_page_empty`): per-layer panels are
    mostly under 2 MB, too small to get huge pages of their own."""
    from slmkit.models.memory import huge_page_slices

    todo = [m for m in modules if m._cache.get("native_panels") is None]
    for m, out in zip(todo, huge_page_slices([panel_bytes(m) for m in todo])):
        panels(m, out=out)


def _dense_to_huge_pages(mods: list) -> None:
    """Move the fp32 ``nn.Linear`` weights the step streams that are not in a huge-page
    buffer yet (o_proj, down_proj, the LM head, unfused projections; the fused ones are
    built in one) into one (:func:`~slmkit.models.memory.move_to_huge_pages`). Measured on
    the 135M shape, batch 1: 19.3 -> 18.4 ms per step with the fused weights alone in huge
    pages, and 14.3 -> 12.5 ms with every weight."""
    from slmkit.models.memory import HUGE_PAGE, in_huge_pages, move_to_huge_pages

    params, seen = [], set()
    for m in mods:
        w = m.weight
        if w.dtype == torch.float32 and w.device.type == "cpu" and id(w) not in seen \
                and not in_huge_pages(w):
            seen.add(id(w))                    # a tied head and embedding: one parameter
            params.append(w)
    if sum(p.numel() * 4 for p in params) >= HUGE_PAGE:
        move_to_huge_pages(params)


def panels(module, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``QuantLinear``'s codes repacked for the VNNI kernels (``q8_panel`` and ``q4_panel`` in decode.c).

    Rows go in panels of 16 (the last one zero-padded). int8: ``[P, k/4, 16, 4]``, each
    64-byte vector the same 4 columns of 16 rows; int4: ``[P, k/8, 16, 4]``, byte ``b`` of
    row ``i`` in vector ``v`` holding column ``8v+b`` (low nibble) and ``8v+4+b`` (high).
    Scales and zero points as float ``[P, G, 16]``. Built once per layer and kept in the
    layer's kernel cache (dropped on ``.to()``), so every runner of a model shares one copy:
    the same byte count as the codes, on top of them. ``out``: a ``uint8`` buffer of
    :func:`panel_bytes` to build the codes in (default: a new tensor).
    """
    cached = module._cache.get("native_panels")
    if cached is not None:
        return cached
    with torch.no_grad():
        codes = module.codes()
        n, k = codes.shape
        P = (n + 15) // 16
        pad = P * 16 - n
        scales, zeros = module.scales.float(), module.zero_points()
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad, k)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        if module.bits == 8:
            pw = codes.view(P, 16, k // 4, 4).permute(0, 2, 1, 3)
        else:
            c = codes.view(P, 16, k // 8, 2, 4)
            pw = (c[:, :, :, 0, :] | (c[:, :, :, 1, :] << 4)).permute(0, 2, 1, 3)
        pw = pw.contiguous() if out is None else out.view(pw.shape).copy_(pw)
        G = scales.shape[1]
        psc = scales.view(P, 16, G).permute(0, 2, 1).contiguous()
        pzf = zeros.view(P, 16, G).permute(0, 2, 1).contiguous()
    module._cache["native_panels"] = (pw, psc, pzf)
    return pw, psc, pzf


def _group(mods, keep, vnni, fused, used=None) -> list[Lin] | str:
    if fused is not None:
        lin = _lin(None, keep, vnni, fused, used)
        return lin if isinstance(lin, str) else [lin]
    lins = [_lin(m, keep, vnni, used=used) for m in mods]
    for lin in lins:
        if isinstance(lin, str):
            return lin
    if len({lin.kind for lin in lins}) != 1 or len({lin.k for lin in lins}) != 1:
        return "projections that share an input use different kernels"
    return lins


def quant_embedder(lib, module):
    """``ids [N] -> rows [N, D]`` fp32 of an 8- or 4-bit ``QuantEmbedding`` through the
    library (the same float ops as its forward; 8 rows: a few us instead of ~0.17 ms of
    torch ops per decode step), or None for any other embedding (its own forward runs)."""
    from slmkit.nn.quant_embedding import QuantEmbedding

    if not isinstance(module, QuantEmbedding) or module.bits not in (8, 4) \
            or module.out_dtype != torch.float32 or module.qweight.device.type != "cpu" \
            or getattr(module, "input_scale", None) is not None \
            or getattr(module, "embed_scale", 1.0) != 1.0 \
            or (module.bits == 4 and module.embedding_dim % 2):
        return None
    D, V = module.embedding_dim, module.num_embeddings
    group = D if module.group_size == -1 else module.group_size

    def embed(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), D, dtype=torch.float32)
        zeros = None if module.sym else module.zeros.data_ptr()
        if lib.slm_embed_rows(module.qweight.data_ptr(), module.scales.data_ptr(), zeros,
                              module.bits, group, D, module.scales.shape[1], V,
                              ids.data_ptr(), ids.numel(), out.data_ptr()):
            raise IndexError(f"token id out of range for an embedding of {V} rows")
        return out

    return embed


def argmax_rows(x: torch.Tensor) -> list[int]:
    """``x.argmax(-1).tolist()`` for ``[B, V]`` fp32 logits, vectorized when the library is
    built (torch's CPU argmax takes ~0.3 ms for 8 rows of a 49k vocabulary)."""
    lib = load_library() if _ENABLED["on"] else None
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        return x.argmax(-1).tolist()
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.slm_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out.tolist()


def mask_rows(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> bool:
    """``logits[rows[j], t] = -inf`` where ``bitmask[j]`` forbids ``t``, in place, for
    ``[B, V]`` fp32 contiguous logits; False (nothing done) without the library."""
    lib = load_library() if _ENABLED["on"] else None
    if lib is None or logits.dtype != torch.float32 or not logits.is_contiguous() \
            or logits.dim() != 2 or not bitmask.is_contiguous():
        return False
    at = torch.tensor(rows, dtype=torch.int64)
    lib.slm_mask_rows(logits.data_ptr(), logits.shape[1], at.data_ptr(), len(rows),
                      bitmask.data_ptr(), bitmask.shape[1])
    return True


def confidence(row: torch.Tensor, token: int) -> tuple[float, float, float] | None:
    """``(log p(token), entropy in nats, largest other logit)`` of a ``[V]`` fp32 logits
    row in one native pass; None without the library (the caller computes them in torch)."""
    lib = load_library() if _ENABLED["on"] else None
    if lib is None or row.dtype != torch.float32 or row.dim() != 1 or not row.is_contiguous():
        return None
    out = (ctypes.c_double * 3)()
    lib.slm_confidence(row.data_ptr(), row.shape[0], int(token), out)
    return out[0], out[1], out[2]


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for ``x`` ``[B, in]`` fp32 through the native kernel (tests, benchmarks).

    Raises:
        RuntimeError: when the library or the layer has no native kernel.
    """
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    keep: list = []
    lin = _lin(module, keep, bool(lib.slm_has_vnni()))
    if isinstance(lin, str):
        raise RuntimeError(lin)
    x = x.to(torch.float32).contiguous()
    B = x.shape[0]
    y = torch.empty(B, lin.n, dtype=torch.float32)
    threads = torch.get_num_threads()
    work = torch.empty(int(lib.slm_linear_work_floats(ctypes.byref(lin), B, threads)),
                       dtype=torch.float32)
    lib.slm_linear(ctypes.byref(lin), B, x.data_ptr(), y.data_ptr(), work.data_ptr(), threads)
    return y


#: config activations and MLP activation modules the step computes -> decode.c's act kind
_ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}
_ACT_MODULES = {"SiLU": 0, "SiLUActivation": 0, "PytorchGELUTanh": 1, "GELUTanh": 1}


#: routers whose rule the step computes: softmax over the experts, the top k, renormalised
#: over them where the config says (Mixtral always; Qwen2/3-MoE's ``norm_topk_prob``)
_ROUTERS = {"MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter"}


def _moe(mlp, keep: list, vnni: bool, used: list | None) -> dict | str | None:
    """A mixture-of-experts block's fields for ``layer_t`` (the router and shared gate as
    kept fp32 pointers, ``exp_lin`` a kept array of each expert's gate|up then down
    :class:`Lin`: slices of transformers' fused fp32 tensors, or the linears of a
    :class:`~slmkit.nn.experts.SplitExperts`, quantized or not), why the step cannot run
    it, or None for a plain MLP."""
    from slmkit.nn.experts import SplitExperts, is_fused

    experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    if experts is None:
        return None
    name = type(router).__name__
    if name not in _ROUTERS:
        return f"mixture-of-experts router {name} has no native step"
    w = getattr(router, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or w.device.type != "cpu":
        return "the mixture-of-experts router is not an fp32 weight on the CPU"
    if router.top_k > 64:
        return f"{router.top_k} experts per token (at most 64 in the native step)"
    if isinstance(experts, SplitExperts):
        lins = [_lin(m, keep, vnni, used=used) for m in [*experts.gate_up, *experts.down]]
        for lin in lins:
            if isinstance(lin, str):
                return "an expert: " + lin
        E = experts.num_experts
        if len({lin.n for lin in lins[:E]}) != 1 or len({lin.n for lin in lins[E:]}) != 1:
            return "the experts' linears differ in shape"
        inter = lins[E].k
    elif is_fused(experts):
        gu, down = experts.gate_up_proj, experts.down_proj
        if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                   for t in (gu, down)):
            return "mixture-of-experts weights are not fused fp32 [experts, out, in] tensors"
        lins = [_lin(None, keep, vnni, (t[e], None))
                for t in (gu.detach(), down.detach()) for e in range(gu.shape[0])]
        E, inter = int(gu.shape[0]), int(down.shape[2])
    else:
        return f"mixture-of-experts weights of {type(experts).__name__} are not fused " \
               "[experts, out, in] tensors"
    gate = getattr(mlp, "shared_expert_gate", None)     # Linear(hidden, 1), maybe quantized
    if gate is not None:
        if getattr(gate, "bias", None) is not None or not hasattr(gate, "weight") \
                and not hasattr(gate, "dense_weight"):
            return "the shared expert's gate is not a linear without bias"
        gate = gate.dense_weight() if hasattr(gate, "dense_weight") else gate.weight.detach()
    table = (Lin * len(lins))(*lins)
    keep.append(table)
    return {"n_exp": E, "top_k": int(router.top_k),
            "norm_topk": int(getattr(router, "norm_topk_prob", True)),
            "moe_inter": int(inter), "router": _ptr(w.detach(), keep),
            "exp_lin": ctypes.addressof(table),
            "shared_gate": _ptr(None if gate is None else
                                gate.float().reshape(-1).contiguous(), keep)}


def _norm_eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))


def _norm_weight(norm, keep: list) -> int | str:
    """Pointer to the fp32 factor an RMSNorm multiplies ``x_hat`` by: its weight, or for
    Gemma's ``x_hat * (1 + w)`` a kept copy of ``1 + w``; or why the step cannot."""
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dtype != torch.float32 or not (
            name in arch.NATIVE_RMS_NORMS or name in arch.NORM_OFFSETS):
        return f"norm {name} is not an fp32 RMSNorm"
    if name in arch.NORM_OFFSETS:
        return _ptr((weight.detach() + arch.NORM_OFFSETS[name]).contiguous(), keep)
    return _ptr(weight.detach(), keep)


class NativeStep:
    """The compiled decode step bound to one :class:`~slmkit.engine.runner.FastRunner`.

    Build with :meth:`create`, which returns None (and a reason) when the model or the
    machine does not fit.
    """

    def __init__(self, lib, model_struct: Model, keep: list, max_rows: int, vocab: int,
                 hidden: int):
        self.lib, self.struct, self.keep = lib, model_struct, keep
        self.vocab, self.hidden = vocab, hidden
        self.work = torch.empty(int(lib.slm_work_floats(ctypes.byref(model_struct), max_rows)),
                                dtype=torch.float32)
        self.max_rows = max_rows
        self.prefills = False   # whether the runner sends prompt chunks here (see create)
        self.embed = None       # a native row lookup for a quantized embedding (see create)
        self.tap_after = 0      # decode steps copy the rows' hidden states after this many
        self.tapped = None      # blocks into tapped [B, hidden] (0: off)

    @classmethod
    def create(cls, runner) -> tuple[NativeStep | None, str | None]:
        if not _ENABLED["on"]:
            return None, "turned off (native.set_enabled(False))"
        lib = load_library()
        if lib is None:
            return None, unavailable_reason()
        model = runner.model
        cfg = model.config
        if runner.dtype != torch.float32 or runner.device.type != "cpu":
            return None, "the native step runs fp32 activations on the CPU"
        act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")
        if act not in _ACTS:
            return None, f"activation '{act}' is not SiLU or GELU-tanh"
        if runner.head_dim > MAX_HEAD_DIM or runner.head_dim % 2:
            return None, f"head dim {runner.head_dim} is not supported"
        if runner.cache.dtype not in KV_KINDS:
            return None, f"the native step keeps no {runner.cache.dtype} KV cache"
        vnni = bool(lib.slm_has_vnni())
        used: list = []        # a dry run first: nothing is built or moved for a refusal
        _, reason = cls._assemble(runner, lib, vnni, used)
        if reason is not None:
            return None, reason
        pack_panels([m for m in used if _quant_reason(m, vnni) is None])
        _dense_to_huge_pages([m for m in used if type(m) is torch.nn.Linear])
        return cls._assemble(runner, lib, vnni)

    @classmethod
    def _assemble(cls, runner, lib, vnni: bool,
                  used: list | None = None) -> tuple[NativeStep | None, str | None]:
        """The step for ``runner``, or why not; with ``used``, a dry run that only checks
        and lists the linear modules the step would read."""
        model = runner.model
        cfg = model.config
        keep: list = []
        layers = (Layer * len(runner.layers))()
        eps = None
        act_kind = None
        inter = 0          # the widest dense MLP (or shared expert): the step's buffers
        for i, layer in enumerate(runner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            head_norms = [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
            sandwich = hasattr(layer, "pre_feedforward_layernorm")     # Gemma 2 / 3
            mlp_norm = layer.pre_feedforward_layernorm if sandwich else \
                layer.post_attention_layernorm
            outs = [layer.post_attention_layernorm, layer.post_feedforward_layernorm] \
                if sandwich else [None, None]
            weights = []
            for norm in [layer.input_layernorm, mlp_norm, *head_norms, *outs]:
                w = None if norm is None else _norm_weight(norm, keep)
                if isinstance(w, str):
                    return None, w
                weights.append(w)
                if norm is not None:
                    e = _norm_eps(norm)
                    if eps is not None and e != eps:
                        return None, "the norms do not share one epsilon"
                    eps = e
            moe = _moe(mlp, keep, vnni, used)
            if isinstance(moe, str):
                return None, moe
            if moe is not None:                    # the shared expert (or none) as the MLP
                mlp = getattr(mlp, "shared_expert", None)
            if hasattr(attn, "qkv_proj"):          # Phi-3: one linear, rows q | k | v
                qkv = _group([attn.qkv_proj], keep, vnni, None, used)
            else:
                qkv = _group([attn.q_proj, attn.k_proj, attn.v_proj], keep, vnni,
                             getattr(attn, "_slmkit_qkv", None) if runner.qkv[i] is not None
                             else None, used)
            if mlp is None:                        # Mixtral: experts only
                gu, down = [], Lin()
            elif hasattr(mlp, "gate_up_proj"):     # Phi-3: one linear, rows gate | up
                gu = _group([mlp.gate_up_proj], keep, vnni, None, used)
            else:
                gu = _group([mlp.gate_proj, mlp.up_proj], keep, vnni,
                            getattr(mlp, "_slmkit_gate_up", None)
                            if runner.mlps[i] is not layer.mlp else None, used)
            o = _lin(attn.o_proj, keep, vnni, used=used)
            if mlp is not None:
                down = _lin(mlp.down_proj, keep, vnni, used=used)
            for part in (qkv, gu, o, down):
                if isinstance(part, str):
                    return None, part
            if gu:
                inter = max(inter, gu[0].n if len(gu) == 2 else gu[0].n // 2)
            act = getattr(mlp if mlp is not None else layer.mlp.experts, "act_fn", None) \
                or getattr(mlp, "activation_fn", None)
            kind = _ACT_MODULES.get(type(act).__name__)
            if kind is None or act_kind not in (None, kind):
                return None, f"MLP activation {type(act).__name__} is not SiLU or GELU-tanh"
            act_kind = kind
            L = layers[i]
            L.norm1, L.norm2, L.qn, L.kn, L.norm_ao, L.norm_mo = weights
            for j, lin in enumerate(qkv):
                L.qkv[j] = lin
            L.n_qkv = len(qkv)
            for j, lin in enumerate(gu):
                L.gu[j] = lin
            L.n_gu = len(gu)
            L.o, L.down = o, down
            if moe is not None:
                L.n_exp, L.top_k, L.norm_topk, L.moe_inter = (
                    moe["n_exp"], moe["top_k"], moe["norm_topk"], moe["moe_inter"])
                L.router, L.exp_lin, L.shared_gate = (
                    moe["router"], moe["exp_lin"], moe["shared_gate"])
            # FamilyRunner: a sliding layer's ring (rows) or the full cache, at index j
            rows, j = runner.where[i] if hasattr(runner, "where") else (None, i)
            cache = runner.cache if rows is None else runner.rings[rows]
            L.kc = _ptr(cache.k[j], keep)
            L.vc = _ptr(cache.v[j], keep)
            if cache.quantized:
                L.ks = _ptr(cache.ks[j], keep)
                L.vs = _ptr(cache.vs[j], keep)
            L.window = runner.windows[i] or 0
            L.rows = rows or 0
            rope = getattr(runner, "rope", None)       # per-layer tables (FamilyRunner)
            if rope is not None and rope[i][0] is not runner.cos:
                L.cos = _ptr(rope[i][0].contiguous(), keep)
                L.sin_signed = _ptr(rope[i][1].contiguous(), keep)
        head = _lin(runner.lm_head, keep, vnni, used=used)
        if isinstance(head, str):
            return None, "LM head: " + head
        final = _norm_weight(runner.norm, keep)
        if isinstance(final, str):
            return None, "final " + final
        attn0 = runner.layers[0].self_attn
        m = Model()
        m.n_layers, m.hidden = len(runner.layers), cfg.hidden_size
        m.n_heads, m.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        m.head_dim, m.inter, m.vocab = runner.head_dim, inter, head.n
        m.max_seq, m.n_threads = runner.max_seq_len, torch.get_num_threads()
        m.eps, m.attn_scale = float(eps), float(attn0.scaling)
        m.cos = _ptr(runner.cos.contiguous(), keep)
        m.sin_signed = _ptr(runner.sin.contiguous(), keep)
        m.final_norm = final
        m.layers = ctypes.cast(layers, ctypes.POINTER(Layer))
        keep.append(layers)
        m.lm_head = head
        m.kv_kind = KV_KINDS[runner.cache.dtype]
        m.resid_mult = float(getattr(runner, "residual_mult", None) or 1.0)
        m.act = act_kind or 0
        m.attn_softcap = float(getattr(runner, "attn_cap", None) or 0.0)   # Gemma 2
        m.rot = runner.cos.shape[-1]                     # partial rotary: fewer than head_dim
        if used is not None:
            return None, None
        step = cls(lib, m, keep, runner.n_slots, head.n, cfg.hidden_size)
        # prompt chunks too when the layers are quantized (measured on the 135M shape, 128
        # tokens: int8 62 vs 300 ms, int4 58 vs 242 ms); fp32 chunks stay with torch's GEMM
        # (237 vs 269 ms)
        step.prefills = head.kind != LIN_F32 or any(
            layers[i].down.kind != LIN_F32 or layers[i].o.kind != LIN_F32
            for i in range(len(runner.layers)))
        step.embed = quant_embedder(lib, runner.embed)
        return step, None

    def _ensure_work(self, rows: int) -> None:
        """Take torch's current thread count, and grow the workspace to what ``rows`` rows
        need with it (each thread keeps its own scratch there)."""
        self.struct.n_threads = torch.get_num_threads()
        need = int(self.lib.slm_work_floats(ctypes.byref(self.struct), rows))
        if self.work.numel() < need:
            self.work = torch.empty(need, dtype=torch.float32)

    def prefill(self, h: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """A prompt chunk: ``h`` ``[T, hidden]`` embeddings of tokens at positions
        ``start .. start + T - 1`` of cache ``slot`` -> ``[1, vocab]`` logits of the last."""
        T = h.shape[0]
        h = h.to(torch.float32).contiguous()
        self._ensure_work(T)
        slot_t = torch.full((T,), slot, dtype=torch.int64)
        pos_t = torch.arange(start, start + T, dtype=torch.int64)
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        self.struct.tap = None      # taps are for decode steps
        self.lib.slm_prefill(ctypes.byref(self.struct), T, h.data_ptr(), slot_t.data_ptr(),
                             pos_t.data_ptr(), logits.data_ptr(), self.work.data_ptr())
        return logits

    def verify(self, h: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Rows that may continue one another in a slot (speculative decoding: a request's
        last token and its drafts at consecutive positions, several requests side by side):
        ``h`` ``[N, hidden]`` -> ``[N, vocab]`` logits of every row. Keys and values of all
        rows are written before any row attends; each row's logits are bit-identical to a
        decode step's at its position."""
        N = h.shape[0]
        h = h.to(torch.float32).contiguous()
        self._ensure_work(max(N, self.max_rows))
        slot_t = torch.tensor(slots, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        logits = torch.empty(N, self.vocab, dtype=torch.float32)
        self.struct.tap = None      # taps are for decode steps
        self.lib.slm_verify(ctypes.byref(self.struct), N, h.data_ptr(), slot_t.data_ptr(),
                            pos_t.data_ptr(), logits.data_ptr(), self.work.data_ptr())
        return logits

    def __call__(self, h: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """``h`` ``[B, hidden]`` embeddings of the new tokens -> ``[B, vocab]`` logits."""
        B = h.shape[0]
        h = h.to(torch.float32).contiguous()
        slot_t = torch.tensor(slots, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        logits = torch.empty(B, self.vocab, dtype=torch.float32)
        if torch.get_num_threads() != self.struct.n_threads:
            self._ensure_work(self.max_rows)
        self.tapped = None
        if self.tap_after:          # the hidden states after tap_after blocks, per row
            self.tapped = torch.empty(B, self.hidden, dtype=torch.float32)
            self.struct.tap_after, self.struct.tap = self.tap_after, self.tapped.data_ptr()
        else:
            self.struct.tap = None
        self.lib.slm_decode(ctypes.byref(self.struct), B, h.data_ptr(), slot_t.data_ptr(),
                            pos_t.data_ptr(), logits.data_ptr(), self.work.data_ptr())
        return logits
