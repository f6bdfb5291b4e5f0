"""Generate with an exported ONNX decoder on ONNX Runtime (CPU), with the KV cache.

    >>> from slmkit.export.onnx_runner import OnnxRunner
    >>> runner = OnnxRunner("runs/model-onnx")
    >>> print(runner.generate("def fibonacci(n):", max_new_tokens=32))

:meth:`OnnxRunner.stream_tokens` has the same contract as ``slmkit.engine.stream_tokens``:
greedy token ids, one at a time, the first right after prefill. Run it from a shell with
``python -m slmkit.export.onnx_runner DIR "prompt"``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slmkit.errors import ModelLoadError

MODEL_FILE = "model.onnx"
META_FILE = "onnx.json"


class OnnxRunner:
    """An ONNX Runtime session over a directory written by ``slm export --format onnx``.

    Args:
        export_dir: the exported directory (``model.onnx``, ``onnx.json``, tokenizer).
        threads: intra-op threads (default: ONNX Runtime's choice).
    """

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        meta_path, model_path = self.dir / META_FILE, self.dir / MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise ModelLoadError(f"'{export_dir}' is not an ONNX export (no {MODEL_FILE} / "
                                 f"{META_FILE}); create one with `slm export MODEL --format "
                                 "onnx --out DIR`.")
        self.meta = json.loads(meta_path.read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), opts,
                                            providers=["CPUExecutionProvider"])
        self.past_names = self.meta["inputs"][1:]
        self.eos = self.meta.get("eos_token_id")
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from slmkit.models.io import load_tokenizer

            self._tokenizer = load_tokenizer(self.dir)
        return self._tokenizer

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.meta["num_kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray,
                                                                      list[np.ndarray]]:
        """One call: ``ids`` ``[B, T]`` int64 after ``past`` -> (logits ``[B, T, V]``,
        present)."""
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feed.update(zip(self.past_names, past))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def logits(self, ids: list[int], prefill: int | None = None) -> np.ndarray:
        """Logits ``[len(ids), V]``: the first ``prefill`` tokens in one call (default all),
        the rest one cached step each (so both paths are exercised)."""
        prefill = len(ids) if prefill is None else max(1, min(prefill, len(ids)))
        arr = np.asarray([ids], dtype=np.int64)
        out, past = self.step(arr[:, :prefill], self.empty_past())
        parts = [out[0]]
        for j in range(prefill, len(ids)):
            out, past = self.step(arr[:, j: j + 1], past)
            parts.append(out[0])
        return np.concatenate(parts, axis=0)

    def stream_tokens(self, prompt_ids: list[int], max_new_tokens: int,
                      stop_at_eos: bool = True) -> Iterator[int]:
        """Greedy decode: yield token ids one at a time (first right after prefill)."""
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        logits, past = self.step(np.asarray([prompt_ids], dtype=np.int64), self.empty_past())
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            yield token
            if stop_at_eos and token == self.eos:
                return
            logits, past = self.step(np.asarray([[token]], dtype=np.int64), past)

    def generate(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Greedy continuation of ``prompt`` as text."""
        tok = self.tokenizer
        from slmkit.engine.generate import prompt_ids

        ids = prompt_ids(tok, prompt)
        new = list(self.stream_tokens(ids, max_new_tokens))
        return tok.decode(new, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.stderr.write("usage: python -m slmkit.export.onnx_runner DIR PROMPT [MAX_NEW]\n")
        sys.exit(2)
    runner = OnnxRunner(args[0])
    sys.stdout.write(runner.generate(args[1], int(args[2]) if len(args) > 2 else 64) + "\n")


if __name__ == "__main__":
    main()
