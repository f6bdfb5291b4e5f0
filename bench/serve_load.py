"""Serving load benchmark: 1, 8 and 32 concurrent streaming clients against `slm serve`.

Model: a random SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads / 3 KV heads,
MLP 1536, vocabulary 49152, tied embeddings), quantized to int8 (RTN per channel, LM head
included) with ``slmkit.compress.quantize`` -- or fp32 with ``--fp32``. The tokenizer is a
byte-level BPE trained on the stdlib; it has fewer entries than the model's 49152 ids, so
some random tokens decode to no text (throughput counts tokens from ``usage``, not text).

The server runs as a real ``slm serve`` subprocess (``--max-concurrency`` = the largest
client count); the clients are asyncio ``httpx`` streams of ``/v1/chat/completions`` with
``ignore_eos`` so every request generates exactly ``--max-tokens`` tokens. Per level:

* throughput: completion tokens / wall seconds (all clients together);
* TTFT: request sent -> first SSE frame (the server sends its first frame only once the
  first token exists), p50 / p99;
* latency: request sent -> ``[DONE]``, p50 / p99;
* errors: non-200 answers, error frames, streams without ``[DONE]``;
* the bare engine's aggregate tok/s at the same concurrency (no HTTP, same run), so the
  table separates what the server costs from what the machine's batching can give.

Bar (issue 9): at 8 clients >= 4x the single-client throughput, with zero errors.
llama.cpp's server is the baseline only when ``llama_cpp`` imports in this venv (not built
here: it takes 12+ minutes to compile on 2 cores); otherwise the table says so.

Run under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/serve_load.py

Writes ``bench/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=2048, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
CACHE = ROOT / ".cache" / "serve_bench"


def build_model_dir(fp32: bool, layers: int) -> Path:
    """Save (once) the random 135M-shaped model, int8 unless ``fp32``; returns its dir."""
    out = CACHE / f"smollm2-135m-random-{'fp32' if fp32 else 'int8'}-{layers}l"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.models import save_model
    from slmkit.models.tokenizer import stdlib_sample, train_tokenizer

    tok = train_tokenizer(stdlib_sample(max_files=400, max_bytes=8_000_000), vocab_size=49152)
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers,
                            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    model = LlamaForCausalLM(config).eval()
    if not fp32:
        from slmkit.compress.quantize import make_config, quantize_model

        # LM head stays fp32: Engine() reads lm_head.weight, which a QuantLinear head lacks
        quantize_model(model, None, make_config(method="rtn", bits=8, group_size=-1, sym=True,
                                                ignore=["lm_head"]))
    save_model(model, tok, out, step="bench", params={"bench": "serve_load"}, overwrite=True)
    return out


def start_server(model_dir: Path, slots: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "OMP_NUM_THREADS": str(threads)}
    log = open(CACHE / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", str(model_dir),
                             "--port", "0", "--name", "bench", "--max-concurrency", str(slots),
                             "--max-queue", "1024", "--request-timeout", "3600",
                             "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    seen = ""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"slm serve exited: see {CACHE / 'server.log'}")
        seen += line
        if m := re.search(r"(http://127\.0\.0\.1:\d+)/v1", seen):
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("slm serve did not start within 300 s")


async def one_request(client, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, usage, done, error = None, None, False, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                usage = chunk.get("usage") or usage
    except Exception as e:  # connection errors count as errors, not crashes
        return {"error": f"{type(e).__name__}: {e}"}
    if error or not done or usage is None:
        return {"error": error or "stream ended without [DONE]/usage"}
    return {"ttft": ttft, "latency": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"]}


async def run_level(url: str, clients: int, requests: int, body: dict) -> dict:
    import httpx

    results = []
    todo = list(range(requests))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker():
            while todo:
                i = todo.pop()
                results.append(await one_request(client, {**body, "seed": i}))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values \
            else float("nan")

    ttft = [r["ttft"] for r in ok]
    lat = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": requests, "ok": len(ok), "errors": len(errors),
            "error_samples": errors[:3], "tokens": tokens, "wall_s": wall,
            "throughput_tok_s": tokens / wall, "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p99_s": pct(ttft, 0.99), "latency_p50_s": pct(lat, 0.5),
            "latency_p99_s": pct(lat, 0.99),
            "mean_ttft_s": statistics.fmean(ttft) if ttft else float("nan")}


def engine_baseline(model_dir: Path, levels: list[int], messages: list[dict],
                    max_tokens: int, threads: int) -> dict[int, float]:
    """Aggregate tok/s of the bare :class:`~slmkit.engine.Engine` (no HTTP) per level.

    The same model, prompt and token count as the server run, in this process, before the
    server starts: the ceiling the server can reach on this machine right now.
    """
    import torch

    from slmkit.engine import Engine, SamplingParams
    from slmkit.models import load_model

    model, tok = load_model(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = {}
    with Engine(model, tok, max_batch=max(levels), background=False, threads=threads) as engine:
        engine.generate(ids, SamplingParams(max_tokens=4, temperature=0))  # warm-up
        for n in levels:
            t0 = time.perf_counter()
            handles = [engine.submit(ids, params) for _ in range(n)]
            while not all(h.done for h in handles):
                engine.step()
            out[n] = sum(len(h.result().token_ids) for h in handles) / (time.perf_counter() - t0)
    del model
    torch.set_num_threads(threads)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="serve fp32 instead of int8")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)

    from slmkit.console import console, print_table

    model_dir = build_model_dir(args.fp32, args.layers)
    messages = [{"role": "user", "content": " ".join(["def compute"] * (args.prompt_words // 2))}]
    bare = engine_baseline(model_dir, levels, messages, args.max_tokens, args.threads)
    proc, url = start_server(model_dir, max(levels), args.threads)
    body = {"model": "bench", "max_tokens": args.max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "messages": messages}
    try:
        asyncio.run(run_level(url, 2, 2, {**body, "max_tokens": 4}))  # warm-up
        rows = [asyncio.run(run_level(url, c, c * args.requests_per_client, body))
                for c in levels]
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(120)
    base = rows[0]["throughput_tok_s"]
    for r in rows:
        r["vs_1_client"] = r["throughput_tok_s"] / base
        r["engine_only_tok_s"] = bare[r["clients"]]
        r["engine_only_vs_1"] = bare[r["clients"]] / bare[levels[0]]
        r["server_vs_engine"] = r["throughput_tok_s"] / bare[r["clients"]]
    try:
        import llama_cpp  # noqa: F401
        baseline = "llama_cpp importable, but the llama.cpp server baseline is not wired in"
    except ImportError:
        baseline = "skipped: llama_cpp is not installed in this venv"
    weights = "fp32" if args.fp32 else "int8 (RTN per channel, fp32 LM head)"
    print_table(f"slm serve load, random SmolLM2-135M shape, {weights}, "
                f"{args.max_tokens} tok/request", [
        (r["clients"], r["requests"], f"{r['throughput_tok_s']:.1f}", f"{r['vs_1_client']:.2f}x",
         f"{r['engine_only_tok_s']:.1f}", f"{r['engine_only_vs_1']:.2f}x",
         f"{r['server_vs_engine']:.2f}", f"{r['ttft_p50_s'] * 1000:.0f}",
         f"{r['ttft_p99_s'] * 1000:.0f}", f"{r['latency_p50_s']:.2f}",
         f"{r['latency_p99_s']:.2f}", r["errors"]) for r in rows],
        header=["clients", "reqs", "tok/s", "x 1", "engine tok/s", "engine x 1", "srv/eng",
                "TTFT p50", "TTFT p99", "lat p50", "lat p99", "errors"])
    console.print("[dim]engine = the bare Engine, same model/prompt/tokens, no HTTP, measured "
                  "in this run; srv/eng = server tok/s over engine tok/s; TTFT in ms, latency "
                  "(lat) in s[/dim]", highlight=False)
    at8 = next((r for r in rows if r["clients"] == 8), None)
    bar = None if at8 is None or levels[0] != 1 else (
        at8["vs_1_client"] >= 4 and at8["errors"] == 0)
    print_table("verdict", [("bar: 8 clients >= 4x 1 client, 0 errors",
                             "n/a" if bar is None else ("PASS" if bar else "FAIL")),
                            ("llama.cpp server baseline", baseline),
                            ("server exit code after SIGTERM", exit_code),
                            ("results", args.out)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "random SmolLM2-135M shape", "weights": weights,
                               "layers": args.layers, "threads": args.threads,
                               "max_tokens": args.max_tokens, "levels": rows, "bar_pass": bar,
                               "baseline": baseline, "server_exit_code": exit_code}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
