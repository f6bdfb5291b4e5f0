"""Training throughput: the slmkit loop vs a minimal hand-written PyTorch loop, same run.

Both train the same Hugging Face model (``micro`` preset, fresh copy from the same seed) on
the same packed stdlib batches at the same precision; runs alternate (A B A B) so load
changes on a shared machine hit both. Reported as tokens/s and the ratio slmkit/baseline
(>= 1.0 means the loop adds no overhead). A ``torch.compile`` variant of the slmkit loop is
measured too; compile time is excluded (warm-up steps).

Also prints the validation perplexity the reference run (``bench/reference.py``) had
reached after 10 minutes of training, read from its log, if it exists.

Run under the shared lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/train_throughput.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def baseline_tokens_per_s(model, batches, steps: int, warmup: int, precision: str) -> float:
    """A minimal hand-written loop: forward, CE, backward, clip, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    model.train()

    def step(i):
        b = batches.batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=b["input_ids"]).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                   b["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return steps * batches.batch_size * batches.seq_len / (time.perf_counter() - t0)


def slmkit_tokens_per_s(model, batches, steps: int, warmup: int, precision: str,
                        compile_: bool = False) -> float:
    """The slmkit Trainer (LM objective, progress display and logging on, no eval/ckpt)."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import Trainer
    from slmkit.train.objectives import LMObjective

    cfg = TrainConfig(model="micro", max_steps=10 ** 6, seq_len=batches.seq_len,
                      batch_size=batches.batch_size, lr=1e-3, warmup_steps=0,
                      precision=precision, compile=compile_, log_every=1)
    trainer = Trainer(model, LMObjective(), batches, cfg)
    trainer.fit(until_step=warmup)
    trainer.peak_flops()                      # measured once, outside the timed part
    t0 = time.perf_counter()
    trainer.fit(until_step=warmup + steps)
    return steps * batches.batch_size * batches.seq_len / (time.perf_counter() - t0)


def ten_minute_perplexity() -> dict | None:
    """Val figures of the reference run at the last eval within 10 minutes of training."""
    from bench.reference import _model_dir

    log_file = _model_dir() / "train_log.json"
    if not log_file.is_file():
        return None
    vals = json.loads(log_file.read_text())["val_history"]
    within = [r for r in vals if r["elapsed"] <= 600] or vals[:1]
    return {"at_minutes": within[-1]["elapsed"] / 60, **within[-1],
            "final": vals[-1]} if within else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = ap.parse_args()

    from bench.reference import reference_tokenizer_dir
    from slmkit.console import configure, print_table
    from slmkit.data.tokens import token_stream
    from slmkit.models import load_tokenizer
    from slmkit.models.presets import init_model
    from slmkit.models.tokenizer import train_tokenizer_on_corpus
    from slmkit.train.batches import PackedBatches

    configure()
    torch.set_num_threads(2)
    tok_dir = reference_tokenizer_dir()
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer_on_corpus("stdlib", 8192, tok_dir, overwrite=True)
    tok = load_tokenizer(tok_dir)
    batches = PackedBatches(token_stream("stdlib", tok, "train"), args.seq_len,
                            args.batch_size, seed=0)

    def fresh():
        return init_model("micro", tok, seed=0)

    rows, results = [], {}
    for precision in args.precisions.split(","):
        base, ours = [], []
        for _ in range(args.repeats):        # alternate A B A B against load drift
            base.append(baseline_tokens_per_s(fresh(), batches, args.steps, args.warmup,
                                              precision))
            ours.append(slmkit_tokens_per_s(fresh(), batches, args.steps, args.warmup,
                                            precision))
        b, o = statistics.median(base), statistics.median(ours)
        best = max(ours) / max(base)   # noise only ever slows a run down: best vs best
        results[precision] = {"baseline_tok_s": base, "slmkit_tok_s": ours, "ratio": o / b,
                              "best_ratio": best}
        rows.append((precision, "hand-written loop", b, 1.0))
        rows.append((precision, f"slmkit Trainer (best vs best {best:.3f})", o, o / b))
        if not args.no_compile:
            try:
                c = slmkit_tokens_per_s(fresh(), batches, args.steps, args.warmup + 1,
                                        precision, compile_=True)
                results[precision]["compiled_tok_s"] = c
                rows.append((precision, "slmkit + torch.compile", c, c / b))
            except Exception as e:  # compile can fail without a C++ toolchain
                rows.append((precision, f"torch.compile failed: {type(e).__name__}", 0.0, 0.0))
    print_table(f"training throughput: micro, batch {args.batch_size} x {args.seq_len}, "
                f"2 threads, median of {args.repeats}", rows,
                header=("precision", "loop", "tokens/s", "vs hand-written"))
    ppl = ten_minute_perplexity()
    if ppl:
        results["reference_at_10_min"] = ppl
        print_table("reference run (micro on stdlib): validation at <= 10 min of training", [
            ("minutes", ppl["at_minutes"]), ("step", ppl["step"]), ("tokens", ppl["tokens"]),
            ("val loss", ppl["val_loss"]), ("val perplexity", ppl["val_ppl"]),
            ("val bits/byte", ppl.get("val_bpb", float("nan"))),
            ("final val perplexity", ppl["final"]["val_ppl"])])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
