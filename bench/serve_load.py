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

Baseline, same run, same levels and prompt: llama.cpp's server (``python -m
llama_cpp.server --model X.gguf --n_threads T --host 127.0.0.1 --port P``, from the
``llamacpp`` extra) on a GGUF of the same weights made with slmkit's exporter: Q8_0 from
the fp32 parent of the int8 model (slmkit's int8 is per channel, which no GGML block holds
exactly), or f32 with ``--fp32``. Its server handles one request at a time (the rest wait
in its queue) and, by default, cuts a running stream short when another request arrives
(``interrupt_requests``), so it runs with ``--interrupt_requests false`` to let every
request finish. It sends no ``usage`` in streams and has no ``ignore_eos``: requests are
greedy (``repeat_penalty`` 1, not its default 1.1) with ``min_tokens = max_tokens`` (masks
EOS) and a ``logit_bias`` of -100 on the end-of-generation and non-ASCII tokens (see
:func:`banned_for_llamacpp`). Greedy decoding is deterministic, so a non-streaming request
per prompt first measures its count (``usage``, shown in the verdict next to
``max_tokens``), and each stream that ends with ``finish_reason == "length"`` is credited
with it (anything else is an error). Every request's prompt starts with its own number
(both servers), so llama-cpp-python cannot skip prefill by reusing the previous request's
prompt KV.
Skipped with a reason when ``llama_cpp.server`` does not import, or with ``--skip-llamacpp``.

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


def bench_tokenizer():
    """The stdlib BPE of an earlier run's model dir, or a new one (49152 tokens, slow)."""
    from slmkit.models import load_tokenizer
    from slmkit.models.tokenizer import stdlib_sample, train_tokenizer

    for old in sorted(CACHE.glob("smollm2-135m-random-*/tokenizer.json")):
        return load_tokenizer(old.parent)
    return train_tokenizer(stdlib_sample(max_files=400, max_bytes=8_000_000), vocab_size=49152)


def build_model_dir(fp32: bool, layers: int) -> Path:
    """Save (once) the random 135M-shaped model, int8 unless ``fp32``; returns its dir.

    The int8 model is the fp32 one (same seed, same weights) quantized, so the fp32 dir is
    also the dense parent the llama.cpp GGUF is exported from.
    """
    out = CACHE / f"smollm2-135m-random-{'fp32' if fp32 else 'int8'}-{layers}l"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.models import save_model

    tok = bench_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers,
                            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    model = LlamaForCausalLM(config).eval()
    if not fp32:
        from slmkit.compress.quantize import make_config, quantize_model

        # LM head stays fp32, as in slm quantize's default (ignore=["lm_head"])
        quantize_model(model, None, make_config(method="rtn", bits=8, group_size=-1, sym=True,
                                                ignore=["lm_head"]))
    save_model(model, tok, out, step="bench", params={"bench": "serve_load"}, overwrite=True)
    return out


def build_gguf(fp32: bool, layers: int) -> Path:
    """Export (once) the fp32 parent with slmkit's exporter: Q8_0, or f32 with ``fp32``."""
    import gguf

    from slmkit.export import gguf_meta
    from slmkit.export.gguf_export import export_gguf

    quant = "f32" if fp32 else "q8_0"
    out = CACHE / f"smollm2-135m-random-{layers}l-{quant}-v2.gguf"
    if not out.exists():
        export_gguf(str(build_model_dir(True, layers)), out, quant=quant)
    return out


def llamacpp_server_missing() -> str | None:
    """Why ``python -m llama_cpp.server`` cannot run here, or None when it can."""
    try:
        import llama_cpp.server.app  # noqa: F401  (fastapi, sse-starlette, ... too)
    except ImportError as e:
        return f"skipped: llama_cpp.server does not import ({e}); pip install -e \".[llamacpp]\""
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llamacpp_server(gguf_path: Path, threads: int,
                          n_ctx: int) -> tuple[subprocess.Popen, str]:
    """``python -m llama_cpp.server`` on 127.0.0.1; returns once ``/v1/models`` answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(CACHE / "llamacpp_server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path),
                             "--model_alias", "bench", "--n_threads", str(threads),
                             "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
                             "--interrupt_requests", "false", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: see {CACHE / 'llamacpp_server.log'}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not start within 300 s")


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Send ``sig``, then wait (SIGKILL after 120 s); the exit code.

    ``slm serve`` shuts down gracefully on SIGTERM; ``llama_cpp.server`` (uvicorn.run
    without its own handler) dies of SIGTERM, so it gets SIGINT, uvicorn's clean shutdown.
    """
    proc.send_signal(sig)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


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


async def one_request(client, body: dict, credit: int | None = None) -> dict:
    """One streamed chat completion: TTFT, latency and completion tokens (or an error).

    Tokens come from the stream's ``usage``; a server that sends none (llama.cpp) is
    credited ``credit`` tokens only for a stream that ends with ``finish_reason == "length"``.
    """
    t0 = time.perf_counter()
    ttft, usage, done, error, finish = None, None, False, None, None
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
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # connection errors count as errors, not crashes
        return {"error": f"{type(e).__name__}: {e}"}
    if usage is None and finish == "length" and credit is not None:
        usage = {"completion_tokens": credit}
    if error or not done or usage is None:
        return {"error": error or f"stream ended without [DONE]/usage (finish {finish})"}
    return {"ttft": ttft, "latency": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"], "prompt_tokens": usage.get("prompt_tokens")}


def request_body(body: dict, i: int) -> dict:
    """Request ``i``: its own seed, and a prompt that starts with its number.

    The distinct start keeps a server from reusing the previous request's prompt KV
    (llama-cpp-python reuses the longest matching prefix), so every request pays its prefill.
    """
    (message,) = body["messages"]
    return {**body, "seed": i,
            "messages": [{**message, "content": f"request {i}: {message['content']}"}]}


def level_plan(levels: list[int], per_client: int) -> list[tuple[int, range]]:
    """``(clients, request numbers)`` per level; numbers never repeat across levels."""
    plan, first = [], 0
    for c in levels:
        plan.append((c, range(first, first + c * per_client)))
        first += c * per_client
    return plan


async def run_level(url: str, clients: int, numbers: range, body: dict,
                    credit: dict[int, int] | None = None) -> dict:
    import httpx

    results = []
    todo = list(reversed(numbers))              # popped from the end: in order
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker():
            while todo:
                i = todo.pop()
                results.append(await one_request(client, request_body(body, i),
                                                 credit and credit[i]))

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
    return {"clients": clients, "requests": len(numbers), "ok": len(ok),
            "errors": len(errors),
            "error_samples": errors[:3], "tokens": tokens, "wall_s": wall,
            "prompt_tokens": ok[0]["prompt_tokens"] if ok else None,
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


def banned_for_llamacpp(tokenizer) -> list[int]:
    """Token ids the llama.cpp requests bias away, so each makes ``max_tokens`` tokens.

    The end-of-generation ids (EOS, ``<|im_end|>``) would end a stream early. And
    llama-cpp-python 0.3 skips its ``max_tokens`` check while the text so far ends in what
    it takes for an unfinished UTF-8 sequence (a byte >= 0xC0 among the last three), so a
    random model that emits non-ASCII tokens runs past ``max_tokens`` (73 tokens for 8,
    measured with its default repeat penalty); banning the tokens that do not decode to
    ASCII makes that unlikely. The GGUF's padding ids past the tokenizer (``[PAD..]``) are
    not banned: its logit bias is a Python loop per token, and 20k ids would cost more than
    the decode step; typed UNUSED by the exporter, they detokenize to nothing. The
    count credited per stream is measured anyway (see :func:`llamacpp_levels`).
    """
    eog = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    banned = [i for i in range(len(tokenizer))
              if not tokenizer.decode([i], skip_special_tokens=True).isascii()]
    return sorted({t for t in eog if isinstance(t, int) and t >= 0} | set(banned))


def llamacpp_levels(gguf_path: Path, levels: list[int], args, body: dict,
                    tokenizer) -> dict:
    """The same client levels against ``python -m llama_cpp.server`` (see the docstring).

    Greedy like ``slm serve`` (temperature 0, no repeat penalty: the server's default is
    1.1), ``min_tokens = max_tokens`` and the bias of :func:`banned_for_llamacpp`. Greedy
    decoding is deterministic, so one non-streaming request per prompt first measures its
    token count (``usage.completion_tokens``; this also warms the server up), and each
    stream of that prompt ending with ``finish_reason == "length"`` is credited with it.
    """
    import httpx

    body = {k: v for k, v in body.items() if k not in ("ignore_eos", "stream_options")}
    body.update(min_tokens=args.max_tokens, repeat_penalty=1.0,
                logit_bias={str(t): -100.0 for t in banned_for_llamacpp(tokenizer)})
    proc, url = start_llamacpp_server(gguf_path, args.threads, n_ctx=2048)
    try:
        counts, prompt_tokens = {}, None
        plan = level_plan(levels, args.requests_per_client)
        for i in range(plan[-1][1].stop):
            check = httpx.post(url + "/v1/chat/completions", timeout=3600,
                               json={**request_body(body, i), "stream": False}).json()
            finish = check["choices"][0]["finish_reason"]
            if finish != "length":
                raise RuntimeError(f"llama.cpp stopped early ({finish}) despite min_tokens")
            counts[i] = check["usage"]["completion_tokens"]
            prompt_tokens = prompt_tokens or check["usage"]["prompt_tokens"]
        rows = [asyncio.run(run_level(url, c, numbers, body, counts)) for c, numbers in plan]
    finally:
        exit_code = stop_server(proc, signal.SIGINT)
    return {"levels": rows, "prompt_tokens": prompt_tokens, "exit_code": exit_code,
            "tokens_per_request": sorted(set(counts.values())), "gguf": str(gguf_path),
            "version": __import__("llama_cpp").__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="serve fp32 instead of int8")
    ap.add_argument("--skip-llamacpp", action="store_true",
                    help="skip the llama.cpp server baseline")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)

    from slmkit.console import console, print_table
    from slmkit.models import load_tokenizer

    model_dir = build_model_dir(args.fp32, args.layers)
    skip = "skipped (--skip-llamacpp)" if args.skip_llamacpp else llamacpp_server_missing()
    gguf_path = None if skip else build_gguf(args.fp32, args.layers)
    messages = [{"role": "user", "content": " ".join(["def compute"] * (args.prompt_words // 2))}]
    body = {"model": "bench", "max_tokens": args.max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "messages": messages}
    bare = engine_baseline(model_dir, levels, request_body(body, 0)["messages"],
                           args.max_tokens, args.threads)
    proc, url = start_server(model_dir, max(levels), args.threads)
    try:
        warm = range(10**6, 10**6 + 2)
        asyncio.run(run_level(url, 2, warm, {**body, "max_tokens": 4}))  # warm-up
        rows = [asyncio.run(run_level(url, c, numbers, body))
                for c, numbers in level_plan(levels, args.requests_per_client)]
    finally:
        exit_code = stop_server(proc)
    base = rows[0]["throughput_tok_s"]
    for r in rows:
        r["vs_1_client"] = r["throughput_tok_s"] / base
        r["engine_only_tok_s"] = bare[r["clients"]]
        r["engine_only_vs_1"] = bare[r["clients"]] / bare[levels[0]]
        r["server_vs_engine"] = r["throughput_tok_s"] / bare[r["clients"]]
    lcpp = None
    if gguf_path is not None:
        lcpp = llamacpp_levels(gguf_path, levels, args, body, load_tokenizer(model_dir))
        for r in lcpp["levels"]:
            r["vs_1_client"] = r["throughput_tok_s"] / lcpp["levels"][0]["throughput_tok_s"]
    weights = "fp32" if args.fp32 else "int8 (RTN per channel, fp32 LM head)"
    gguf_what = "f32" if args.fp32 else "Q8_0"

    def cells(r, engine: bool):
        return (r["clients"], r["requests"], f"{r['throughput_tok_s']:.1f}",
                f"{r['vs_1_client']:.2f}x",
                f"{r['engine_only_tok_s']:.1f}" if engine else "-",
                f"{r['engine_only_vs_1']:.2f}x" if engine else "-",
                f"{r['server_vs_engine']:.2f}" if engine else "-",
                f"{r['ttft_p50_s'] * 1000:.0f}", f"{r['ttft_p99_s'] * 1000:.0f}",
                f"{r['latency_p50_s']:.2f}", f"{r['latency_p99_s']:.2f}", r["errors"])

    table = [("slm serve", *cells(r, True)) for r in rows]
    if lcpp:
        table += [(f"llama.cpp ({gguf_what})", *cells(r, False)) for r in lcpp["levels"]]
    print_table(f"serve load, random SmolLM2-135M shape ({args.layers} layers), slm serve "
                f"{weights}, {args.max_tokens} tok/request", table,
                header=["server", "clients", "reqs", "tok/s", "x 1", "engine tok/s",
                        "engine x 1", "srv/eng", "TTFT p50", "TTFT p99", "lat p50",
                        "lat p99", "errors"])
    console.print("[dim]engine = the bare Engine, same model/prompt/tokens, no HTTP, measured "
                  "in this run; srv/eng = server tok/s over engine tok/s; TTFT in ms, latency "
                  "(lat) in s" + ("" if lcpp is None else "; llama.cpp = python -m "
                  "llama_cpp.server on a GGUF of the "
                  f"same weights ({gguf_what}, slmkit's exporter, from the fp32 parent), one "
                  "request at a time; its tokens = the count of an identical greedy request, "
                  "per stream that ended with finish_reason length") + "[/dim]",
                  highlight=False)
    at8 = next((r for r in rows if r["clients"] == 8), None)
    bar = None if at8 is None or levels[0] != 1 else (
        at8["vs_1_client"] >= 4 and at8["errors"] == 0)
    verdict = [("bar: 8 clients >= 4x 1 client, 0 errors",
                "n/a" if bar is None else ("PASS" if bar else "FAIL")),
               ("slm serve exit code after SIGTERM", exit_code)]
    if lcpp:
        for ours, theirs in zip(rows, lcpp["levels"]):
            verdict.append((f"slm serve / llama.cpp server tok/s, {ours['clients']} clients",
                            f"{ours['throughput_tok_s'] / theirs['throughput_tok_s']:.2f}x"))
        verdict += [("llama.cpp server", f"llama-cpp-python {lcpp['version']}, "
                     f"exit code {lcpp['exit_code']} after SIGINT"),
                    ("llama.cpp tokens per request (measured) / max_tokens",
                     f"{', '.join(map(str, lcpp['tokens_per_request']))} / {args.max_tokens}"),
                    ("prompt tokens (slm serve / llama.cpp)",
                     f"{rows[0]['prompt_tokens']} / {lcpp['prompt_tokens']}")]
    else:
        verdict.append(("llama.cpp server baseline", skip))
    verdict.append(("results", args.out))
    print_table("verdict", verdict)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "random SmolLM2-135M shape", "weights": weights,
                               "layers": args.layers, "threads": args.threads,
                               "max_tokens": args.max_tokens, "levels": rows, "bar_pass": bar,
                               "llamacpp": lcpp or skip, "server_exit_code": exit_code},
                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
