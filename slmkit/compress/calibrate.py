"""Layer-by-layer calibration: run a model one decoder block at a time on calibration data.

Calibrated compression (GPTQ, AWQ, Wanda, SparseGPT, activation-aware SVD) needs the
inputs each linear layer sees. Running the whole model with hooks everywhere keeps every
block's activations alive and compresses block ``i`` against *dense* inputs. Instead
(Frantar et al., 2022, "GPTQ", section 4; llm-compressor's sequential pipeline):

1. capture the inputs of decoder block 0 on the calibration batches (the model runs only
   up to block 0, then stops);
2. for each block ``i``: call a per-block callback, which may hook the block's linears
   (:func:`capture_linear_inputs`), run the block on its inputs (:meth:`BlockInputs.run`),
   and compress it in place;
3. run the *compressed* block ``i`` on its inputs; the outputs are block ``i+1``'s inputs.

Peak extra memory is then one block's activations for the calibration set, and the errors
of earlier compressed blocks are seen (and compensated) by later ones.

Typical use (what GPTQ and SparseGPT do)::

    batches = calibration_batches(tok, "stdlib", n_samples=128, seq_len=512)
    def on_block(index, name, block, inputs):
        linears = match_linears(block, targets, ignore)
        for group in sequential_groups(block, inputs, linears):   # true-sequential
            acc = {n: HessianAccumulator(linears[n]) for n in group}
            with capture_linear_inputs({n: linears[n] for n in group},
                                       lambda n, x: acc[n].add(x)):
                inputs.run(block)
            for n in group: compress(linears[n], acc[n].finalize())
    calibrate_layer_by_layer(model, batches, on_block)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slmkit.errors import DataError, ModelLoadError
from slmkit.nn.experts import CHILD

#: Where decoder blocks live in common architectures (tried in order).
BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "transformer.blocks", "model.language_model.layers")


class _StopForward(Exception):
    """Raised by the block-0 hook to stop the model once block 0's inputs are captured."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the decoder blocks of a causal LM.

    Returns:
        ``(dotted_name, module_list)``, e.g. ``("model.layers", ModuleList[...])``.

    Raises:
        ModelLoadError: no known block list is found.
    """
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    # Fallback: the longest ModuleList of identical module types.
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and \
                len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ModelLoadError(f"Cannot find the decoder blocks of {type(model).__name__}; "
                             "layer-by-layer compression supports decoder-only transformers "
                             "with a list of blocks (model.layers / transformer.h).")
    return best


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """What one decoder block receives, for every calibration batch.

    Attributes:
        hidden: per batch, the hidden states ``[batch, seq, hidden]``.
        args: per batch, the other positional arguments the model passed to the block.
        kwargs: per batch, the keyword arguments (attention mask, position embeddings, ...).
    """

    hidden: list[torch.Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    precision: str = "fp32"

    def forward(self, block: nn.Module, i: int):
        """Block ``block`` on batch ``i``, in this calibration's precision (the raw output)."""
        with block_precision(self.precision, self.hidden[i].device.type):
            return block(self.hidden[i], *self.args[i], **self.kwargs[i])

    def head(self, k: int) -> BlockInputs:
        """The first ``k`` batches."""
        return BlockInputs(self.hidden[:k], self.args[:k], self.kwargs[:k], self.precision)

    def first_sequences(self, n: int) -> BlockInputs:
        """The first ``n`` sequences of the first batch, as one batch (every tensor argument
        whose leading dimension is the batch is cut with the hidden states)."""
        b = self.hidden[0].shape[0]
        n = min(n, b)

        def cut(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == b:
                return v[:n]
            if isinstance(v, (tuple, list)):
                return type(v)(cut(x) for x in v)
            if isinstance(v, dict):
                return {k: cut(x) for k, x in v.items()}
            return v

        return BlockInputs([self.hidden[0][:n]], [cut(self.args[0])], [cut(self.kwargs[0])],
                           self.precision)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """Run ``block`` on every batch; returns the output hidden states per batch."""
        outs = []
        for i in range(len(self.hidden)):
            out = self.forward(block, i)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).float())
        return outs

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The same masks/positions with new hidden states (the next block's inputs)."""
        return BlockInputs(hidden=hidden, args=self.args, kwargs=self.kwargs,
                           precision=self.precision)


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` where this CPU multiplies bf16 natively (AVX512-BF16 or
    AMX), else ``"fp32"``; other values pass through."""
    if precision != "auto":
        return precision
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # pragma: no cover - older torch
        native = False
    return "bf16" if native else "fp32"


@contextmanager
def block_precision(precision: str, device_type: str = "cpu") -> Iterator[None]:
    """Run calibration forwards in ``precision``: ``"bf16"`` autocasts the matrix products
    (the weights and the statistics stay float32), ``"fp32"`` runs as is."""
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    else:
        yield


def _exact(fn: Callable[[str, torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
    """``fn`` with autocast off: statistics (Hessians, means) are accumulated in float32."""
    def call(name: str, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):
            fn(name, x.float())
    return call


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> BlockInputs:
    """Run the model on each batch of token ids until decoder block 0; record its inputs.

    Args:
        model: a causal LM (HF ``PreTrainedModel``).
        batches: token id tensors ``[batch, seq]``.

    Returns:
        :class:`BlockInputs` for block 0.
    """
    _, blocks = find_blocks(model)
    device = next(model.parameters()).device
    captured = BlockInputs(hidden=[])

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        if rest:  # GPT-2 passes the cache positionally: drop it
            rest = tuple(None if _is_cache(a) else a for a in rest)
        captured.hidden.append(hidden.detach())
        captured.args.append(_detach(rest))
        captured.kwargs.append(_detach(kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


@contextmanager
def capture_linear_inputs(linears: dict[str, nn.Module],
                          fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, x)`` with each listed linear's input while the context is open.

    ``x`` is flattened to ``[tokens, in_features]`` (``x.reshape(-1, in)``), detached.
    Works for ``nn.Linear``, GPT-2 ``Conv1D`` and slmkit's wrapped layers alike.
    """
    handles = []
    fn = _exact(fn)
    for name, module in linears.items():
        def hook(_m, args, _name=name):
            x = args[0]
            fn(_name, x.detach().reshape(-1, x.shape[-1]))  # [B, T, in] -> [B*T, in]
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def feed_linears(block: nn.Module, inputs: BlockInputs, linears: dict[str, nn.Module],
                 fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``block`` on every batch only as far as ``linears`` read their inputs.

    Calls ``fn(name, x)`` like :func:`capture_linear_inputs`, then stops each batch's
    forward as soon as every listed linear has seen its input. True-sequential GPTQ and
    SparseGPT re-run a block once per group of linears; stopping there skips the rest of
    the block (for q/k/v almost all of it), with the very same inputs collected.
    """
    pending: set[str] = set()

    def take(name: str, x: torch.Tensor) -> None:
        fn(name, x)
        pending.discard(name)
        if not pending:
            raise _StopForward

    with capture_linear_inputs(linears, take):
        for i in range(len(inputs.hidden)):
            pending.update(linears)
            try:
                inputs.forward(block, i)
            except _StopForward:
                pass


@torch.no_grad()
def sequential_groups(block: nn.Module, inputs: BlockInputs,
                      linears: dict[str, nn.Module]) -> list[list[str]]:
    """Group a block's linears by shared input, in execution order ("true sequential").

    Linears that read the very same tensor (q/k/v after the attention norm, gate/up after
    the MLP norm) form one group; groups come in the order the block runs them. GPTQ and
    SparseGPT compress group by group, re-collecting statistics after each, so a later
    group sees the already-compressed earlier ones.

    Returns:
        e.g. ``[["...q_proj", "...k_proj", "...v_proj"], ["...o_proj"],
        ["...gate_proj", "...up_proj"], ["...down_proj"]]`` for a Llama block.
    """
    order: list[tuple[str, int]] = []
    seen: set[str] = set()
    alive: list[torch.Tensor] = []   # held so no later tensor can reuse a recorded id()

    def record(name: str, x: torch.Tensor) -> None:
        if name not in seen:
            seen.add(name)
            base = x._base if x._base is not None else x
            alive.append(base)
            order.append((name, id(base)))

    one = inputs.head(1)
    handles = []
    for name, module in linears.items():
        def hook(_m, args, _name=name):
            record(_name, args[0])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        one.run(block)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_key = None
    for name, key in order:
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_key = key
    groups += [[n] for n in linears if n not in seen]  # never ran (e.g. unused experts)
    return groups


def expert_passes(groups: list[list[str]]) -> list[list[list[str]]]:
    """``groups`` (in execution order) batched into block passes: one group a pass, except
    a split mixture of experts' (:mod:`slmkit.nn.experts`), whose gate|up linears read
    disjoint tokens of one input and so share a pass, then all their downs; placed where
    the first of them ran (experts no token reached run last in ``groups``)."""
    passes: list[list[list[str]]] = []
    stages: dict[tuple[str, str], list[list[str]]] = {}
    for group in groups:
        m = CHILD.match(group[0])
        if m is None or len(group) != 1:
            passes.append([group])
            continue
        prefix = m.group("prefix")
        if (prefix, "gate_up") not in stages:
            stages[prefix, "gate_up"], stages[prefix, "down"] = [], []
            passes += [stages[prefix, "gate_up"], stages[prefix, "down"]]
        stages[prefix, m.group("stage")].append(group)
    return [p for p in passes if p]


BlockCallback = Callable[[int, str, nn.Module, BlockInputs], "list[torch.Tensor] | None"]


@torch.no_grad()
def calibrate_layer_by_layer(model: nn.Module, batches: list[torch.Tensor],
                             on_block: BlockCallback, desc: str = "calibrating",
                             precision: str = "fp32") -> None:
    """Run ``on_block`` on every decoder block in order, feeding compressed outputs forward.

    A callback that already ran the block on every batch may return those outputs; they
    are then the next block's inputs (AWQ feeds the full-precision outputs forward, as its
    reference implementation does) instead of a run of the compressed block.

    Args:
        model: a causal LM; modified in place by the callback.
        batches: calibration token ids, a list of ``[batch, seq]`` tensors.
        on_block: ``on_block(index, block_name, block, inputs)``; compresses ``block`` in
            place. ``block_name`` is the full dotted name (``"model.layers.3"``) so that
            ``match_linears(model, within=block_name)`` gives full linear names.
        desc: progress bar label.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` for the block forwards
            (:func:`resolve_precision`); statistics are float32 either way.
    """
    from slmkit.console import progress

    path, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, batches)
    inputs.precision = resolve_precision(precision)
    with progress(desc, total=len(blocks)) as update:
        for i, block in enumerate(blocks):
            outputs = on_block(i, f"{path}.{i}", block, inputs)
            inputs = inputs.with_hidden(outputs if outputs is not None else inputs.run(block))
            update(1, info=f"block {i + 1}/{len(blocks)}")


def calibration_batches(tokenizer, data: str | list[str] = "stdlib", split: str = "train",
                        n_samples: int = 128, seq_len: int = 512, batch_size: int = 8,
                        seed: int = 0) -> list[torch.Tensor]:
    """Random windows of ``seq_len`` tokens from a corpus, as ``[batch, seq]`` tensors.

    Several corpora (a list) share the windows equally, in turn (``["stdlib",
    "stdlib-prose"]``: half code, half prose), whatever their sizes. Tokens come from the
    corpus token cache (``slmkit.data.tokens.token_stream``), so each corpus is tokenized
    once per tokenizer.

    Raises:
        DataError: a corpus has fewer than ``seq_len + 1`` tokens, or fewer tokens than
            its share of ``n_samples * seq_len / 4`` (too little for meaningful statistics).
    """
    import numpy as np

    specs = [data] if isinstance(data, str) else list(data)
    rng = np.random.default_rng(seed)
    shares = [n_samples // len(specs) + (i < n_samples % len(specs)) for i in range(len(specs))]
    parts = []
    for spec, share in zip(specs, shares):
        if share == 0:
            continue
        stream = _token_stream(spec, tokenizer, split)
        need = max(seq_len + 1, share * seq_len // 4)
        if len(stream) < need:
            raise DataError(f"Calibration data '{spec}' ({split} split) has only "
                            f"{len(stream):,} tokens, fewer than the {need:,} needed for "
                            f"{share} samples of {seq_len} tokens; give more text or lower "
                            "--calib-samples / --calib-seq-len.")
        starts = rng.integers(0, len(stream) - seq_len, size=share)
        parts.append(np.stack([np.asarray(stream[s:s + seq_len], dtype=np.int64)
                               for s in starts]))
    # interleave, so every batch holds every corpus and a shorter run sees them all
    windows = np.stack([p[i] for i in range(max(shares)) for p in parts if i < len(p)])
    ids = torch.from_numpy(windows)  # [n_samples, seq_len]
    return list(ids.split(batch_size))


def _token_stream(data: str, tokenizer, split: str):
    from slmkit.data.tokens import token_stream

    return token_stream(data, tokenizer, split)
