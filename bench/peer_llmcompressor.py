"""Peer harness: llm-compressor's GPTQ and AWQ on the same model, grid and calibration windows.

``bench/real_quality.py`` compares slmkit's GPTQ and AWQ against a well-kept peer. The peer
runs in its own virtual environment (``bench/.peer-venv``, gitignored), so its pins
(llm-compressor wants an older transformers than slmkit) never touch slmkit's ``.venv``.
This file needs nothing from slmkit: it runs under the peer venv's Python.

Two verbs::

    python bench/peer_llmcompressor.py setup
        Creates bench/.peer-venv and installs the pinned llm-compressor there, with torch held
        at the local 2.13.0 CPU build (constraints.txt). Skips all work when the stamp file
        says the same pins are already installed.

    bench/.peer-venv/bin/python bench/peer_llmcompressor.py run \\
        --model HF_DIR --calib IDS.npy --method gptq|awq --bits 4 --group-size 64 \\
        [--sym|--asym] --out OUT_DIR [--threads N] [--overwrite]
        Loads the dense fp32 HF model in HF_DIR, calibrates on exactly the token windows of
        IDS.npy (int64 [n_samples, seq_len], written by slmkit's bench so both sides see the
        same data), applies llm-compressor's GPTQModifier (no act-order, dampening 0.01,
        block 128) or AWQModifier (its default llama mappings, duo scaling) followed by its
        QuantizationModifier, to every Linear layer but lm_head, and writes OUT_DIR as a plain
        dense fp32 HF dir (safetensors, tokenizer copied) holding the fake-quantized weights:
        any evaluator scores it with plain transformers. OUT_DIR/peer.json records the
        versions, the recipe, the calibration data's hash and the calibration wall time.

No network at run time: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE are set
before anything from Hugging Face is imported, and the calibration set is built in memory.
Bad input gets one sentence naming it and exit code 2; the output appears only when whole
(written to a temporary dir beside OUT_DIR, then renamed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".peer-venv"
STAMP = VENV / "slmkit-peer-stamp.json"
CONSTRAINTS = ROOT / "constraints.txt"

# The peer's pins. llm-compressor 0.14.0.1 requires transformers <=5.17.0 and
# compressed-tensors ==0.19.0; torch is held at the local CPU build (a looser spec pulls
# several GB of CUDA wheels).
LLMCOMPRESSOR_VERSION = "0.14.0.1"
PINS = [
    "torch==2.13.0",
    f"llmcompressor=={LLMCOMPRESSOR_VERSION}",
    "compressed-tensors==0.19.0",
    "transformers==5.17.0",
    "datasets==5.2.0",
]

GPTQ_DAMPENING = 0.01       # slmkit's default (GPTQ's percdamp)
GPTQ_BLOCK_SIZE = 128       # slmkit's and the paper's lazy-batch block
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")
QPARAM_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale",
                   "input_scale", "input_zero_point", "output_scale", "output_zero_point")


LIFECYCLE_FIELDS = {"initialized_", "finalized_", "started_", "ended_"}


class PeerError(Exception):
    """Bad input: one sentence naming it and the fix; exit code 2, no traceback."""


# --------------------------------------------------------------------------------- setup

def setup(python: str) -> None:
    if not CONSTRAINTS.is_file():
        raise PeerError(f"{CONSTRAINTS} is missing; run setup from a slmkit checkout.")
    # The stamp holds the pins only: which interpreter invoked setup does not matter.
    want = {"pins": PINS}
    py = VENV / "bin" / "python"
    if STAMP.is_file() and py.exists():
        try:
            have = json.loads(STAMP.read_text())
        except ValueError:
            have = None
        if have == want:
            print(f"peer venv ready: {VENV} (llmcompressor {LLMCOMPRESSOR_VERSION})")
            return
    if VENV.exists():                   # a half-done install or other pins: start over
        shutil.rmtree(VENV)
    t0 = time.perf_counter()
    print(f"creating {VENV} with {python} ...", flush=True)
    subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    # -c constraints.txt holds torch at the local CPU build even where a dependency asks
    # for a looser torch.
    cmd = [str(py), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS), *PINS]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    check = subprocess.run([str(py), "-c", "import llmcompressor, torch; "
                            "print(llmcompressor.__version__, torch.__version__)"],
                           check=True, capture_output=True, text=True)
    STAMP.write_text(json.dumps(want, indent=1) + "\n")
    print(f"peer venv ready in {time.perf_counter() - t0:.0f} s: llmcompressor, torch = "
          f"{check.stdout.strip().splitlines()[-1]}")


# ----------------------------------------------------------------------------------- run

def _offline() -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _check_model_dir(model: Path) -> None:
    if not (model / "config.json").is_file():
        raise PeerError(f"--model {model} is not a Hugging Face model dir (no config.json); "
                        "pass the dense fp32 dir slmkit imported or saved.")
    if not any(model.glob("*.safetensors")):
        raise PeerError(f"--model {model} holds no .safetensors weights; pass a dir saved "
                        "with safetensors (slmkit never loads pickled weights).")


def _load_calib(path: Path, vocab_size: int):
    import numpy as np

    if not path.is_file():
        raise PeerError(f"--calib {path} does not exist; pass the .npy of token windows "
                        "that slmkit's bench wrote.")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PeerError(f"--calib {path} is not a readable .npy array ({e}); write it with "
                        "numpy.save.") from None
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise PeerError(f"--calib {path} has shape {ids.shape}; it must be a 2-D array "
                        "[n_samples, seq_len] with at least one window of 2+ tokens.")
    if ids.dtype.kind not in "iu":
        raise PeerError(f"--calib {path} holds {ids.dtype} values; it must hold integer "
                        "token ids (int64).")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise PeerError(f"--calib {path} holds token ids in [{lo}, {hi}], outside the "
                        f"model's vocabulary [0, {vocab_size}); tokenize with its tokenizer.")
    return ids.astype(np.int64, copy=False)


def _targets(model) -> dict:
    """Every nn.Linear but lm_head: the layers both sides quantize."""
    import torch

    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head"}


def _recipe(args):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = {"num_bits": args.bits, "type": "int", "symmetric": args.sym,
               "strategy": "channel" if args.group_size == -1 else "group",
               "group_size": None if args.group_size == -1 else args.group_size}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if args.method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None,
                             dampening_frac=GPTQ_DAMPENING, block_size=GPTQ_BLOCK_SIZE)]
    # AWQ is a transform: it scales the smoothing/balance layers, then the quantization
    # modifier puts the weights on the grid (min-max observer, its default).
    return [AWQModifier(duo_scaling=True),
            QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


def _cpu_workarounds(torch) -> list[str]:
    """Patches llm-compressor needs to run on a machine with no accelerator; each is named
    in peer.json.

    0.14.0.1's AWQModifier pins its cached block inputs (``IntermediatesCache.pin_memory``)
    before every grid search, unconditionally; ``Tensor.pin_memory()`` raises "Cannot access
    accelerator device when none is available" on a CPU-only torch. Pinning only speeds up
    host-to-device copies, and on CPU there are none, so it becomes a no-op: the numbers
    AWQ computes are the same.
    """
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return ["IntermediatesCache.pin_memory is a no-op (no accelerator: pin_memory() raises)"]


def _recipe_record(recipe) -> list[dict]:
    return [{"modifier": type(m).__name__,
             **m.model_dump(mode="json", exclude=LIFECYCLE_FIELDS)} for m in recipe]


def _fake_quantized_state(model, targets: dict) -> tuple[dict, int]:
    """The model's state with every quantized weight put through its quantize-dequantize
    (GPTQ's weights already lie on the grid; AWQ's QuantizationModifier only computed the
    scales) and the quantization parameters dropped."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith(QPARAM_SUFFIXES)}
    n = 0
    for name, m in targets.items():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            raise RuntimeError(f"llm-compressor left {name} unquantized")
        zp = getattr(m, "weight_zero_point", None)
        g_idx = getattr(m, "weight_g_idx", None)
        if g_idx is not None and (g_idx.diff() < 0).any():
            raise RuntimeError(f"{name} carries an act-order g_idx; the recipe asked none")
        w = fake_quantize(m.weight.detach(), m.weight_scale, zp, scheme.weights)
        state[f"{name}.weight"] = w.to(m.weight.dtype).clone()
        n += 1
    return state, n


def run(args) -> None:
    _offline()
    model_dir = Path(args.model)
    out = Path(args.out)
    _check_model_dir(model_dir)
    if out.exists() and not args.overwrite:
        raise PeerError(f"--out {out} already exists; remove it, choose another dir or "
                        "pass --overwrite.")
    if not out.parent.is_dir():
        raise PeerError(f"--out {out}: its parent dir {out.parent} does not exist; "
                        "create it first.")
    if args.threads < 1:
        raise PeerError(f"--threads {args.threads} must be at least 1.")

    try:
        import llmcompressor
    except ImportError:
        raise PeerError("llmcompressor is not importable here; run `python "
                        "bench/peer_llmcompressor.py setup`, then use "
                        "bench/.peer-venv/bin/python for `run`.") from None
    if llmcompressor.__version__ != LLMCOMPRESSOR_VERSION:
        raise PeerError(f"llmcompressor {llmcompressor.__version__} is installed, the peer "
                        f"is pinned to {LLMCOMPRESSOR_VERSION}; rerun `python "
                        "bench/peer_llmcompressor.py setup`.")
    import compressed_tensors
    import datasets
    import torch
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    config = AutoConfig.from_pretrained(model_dir)
    ids = _load_calib(Path(args.calib), config.vocab_size)
    n_samples, seq_len = ids.shape

    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    targets = _targets(model)
    if args.group_size != -1:
        bad = sorted({m.in_features for m in targets.values()
                      if m.in_features % args.group_size})
        if bad:
            raise PeerError(f"--group-size {args.group_size} does not divide the input "
                            f"features {bad} of this model's Linear layers; pick a divisor "
                            "of every one (or -1 for per channel).")
    recipe = _recipe(args)
    recipe_record = _recipe_record(recipe)      # as asked, before oneshot fills it in
    workarounds = _cpu_workarounds(torch)
    calib = datasets.Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": [[1] * seq_len for _ in range(n_samples)],
    })
    load_s = time.perf_counter() - t_load

    print(f"peer: llmcompressor {llmcompressor.__version__} {args.method} {args.bits}-bit "
          f"g{args.group_size} {'sym' if args.sym else 'asym'} on {len(targets)} Linear layers, "
          f"{n_samples} x {seq_len} calibration tokens, {args.threads} thread(s)", flush=True)
    t0 = time.perf_counter()
    # batch_size 1, no shuffle, num_calibration_samples = all windows: the peer sees
    # exactly the windows slmkit sees. output_dir None: we write the dense dir ourselves.
    model = oneshot(model=model, tokenizer=str(model_dir), recipe=recipe, dataset=calib,
                    num_calibration_samples=n_samples, max_seq_length=seq_len,
                    shuffle_calibration_samples=False, batch_size=1, output_dir=None,
                    log_dir=None)
    calib_s = time.perf_counter() - t0
    print(f"peer: calibration took {calib_s:.1f} s", flush=True)

    state, n_quant = _fake_quantized_state(model, _targets(model))
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"state mismatch: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        dense.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        record = {
            "peer": "llm-compressor",
            "versions": {"llmcompressor": llmcompressor.__version__,
                         "compressed_tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "method": args.method,
            "scheme": {"bits": args.bits, "group_size": args.group_size,
                       "symmetric": args.sym, "targets": "every Linear but lm_head",
                       "quantized_layers": n_quant},
            "recipe": recipe_record,
            "workarounds": workarounds,
            "calibration": {"file": str(Path(args.calib).resolve()),
                            "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                            "n_samples": int(n_samples), "seq_len": int(seq_len)},
            "threads": args.threads,
            "load_s": round(load_s, 2),
            "calibration_wall_s": round(calib_s, 2),
            "source_model": str(model_dir.resolve()),
            "weights": "dense fp32, fake-quantized (dequantized grid values)",
        }
        (tmp / "peer.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"peer: wrote {out} ({n_quant} fake-quantized layers)")


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("setup", help="create bench/.peer-venv with the pinned llm-compressor")
    s.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable),
                   help="interpreter the venv is made from (Python 3.11: the local torch "
                        "2.13.0 CPU wheel is for 3.11)")
    r = sub.add_parser("run", help="quantize with llm-compressor, write a dense fp32 HF dir")
    r.add_argument("--model", required=True, help="dense fp32 HF model dir")
    r.add_argument("--calib", required=True, help=".npy int64 [n_samples, seq_len] token ids")
    r.add_argument("--method", required=True, choices=["gptq", "awq"])
    r.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    r.add_argument("--group-size", type=int, default=64,
                   help="weights per scale along the input dim; -1 = per output channel")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True,
                   help="symmetric grid (default, as slmkit)")
    g.add_argument("--asym", dest="sym", action="store_false", help="grid with zero points")
    r.add_argument("--out", required=True, help="output dir (dense fp32 HF dir + peer.json)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if args.verb == "run" and args.group_size != -1 and args.group_size < 1:
        p.error(f"--group-size {args.group_size} must be positive or -1 (per channel)")
    try:
        if args.verb == "setup":
            setup(args.python)
        else:
            run(args)
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
