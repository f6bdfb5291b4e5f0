"""``slm monitor LOG``: drift of a request log, as a table, Prometheus gauges and an HTML report.

The reference is the log's first ``--reference`` requests or a file of typical prompts
(``--reference-file``: one prompt per line, or JSONL with ``prompt``, ``text`` or chat
``messages``; embedded with the same MiniLM the server logs with); the recent window is
the last ``--window`` requests. Every signal of :func:`slmkit.monitor.drift.compare` is
tested; the report adds plots over the whole log: rolling confidence and flag rate,
embedding MMD of a sliding window against the reference, prompt lengths and languages.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
from slmkit.errors import ConfigError
from slmkit.monitor.config import MonitorConfig
from slmkit.step import StepResult, Table

SIGNALS = ("embedding", "length", "language", "confidence", "flag_rate")


def reference_rows(path: str, embed) -> list[dict]:
    """Rows for a file of typical prompts: embedding (``embed(texts) -> [n, d]``), length
    and language of each."""
    from slmkit.monitor.text import language, read_prompts

    prompts = [p["text"] for p in read_prompts(path, "the reference file", least=5)]
    vectors = embed(prompts)
    return [{"prompt_chars": len(t), "language": language(t), "embedding": v,
             "embedder": "minilm"} for t, v in zip(prompts, vectors)]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def sliding_mmd(rows: list[dict], ref: np.ndarray, window: int, points: int = 40
                ) -> list[tuple[float, float]]:
    """``(time, MMD²)`` of windows of ``window`` embedded rows against ``ref``."""
    from slmkit.monitor.drift import median_bandwidth, mmd_test

    emb = [(r["ts"], r["embedding"]) for r in rows if r.get("embedding") is not None]
    if len(emb) < window or len(ref) < 5:
        return []
    h = median_bandwidth(ref)
    ends = np.unique(np.linspace(window, len(emb), min(points, len(emb) - window + 1)).astype(int))
    return [(emb[e - 1][0], mmd_test(ref, np.stack([v for _, v in emb[e - window:e]]), h,
                                     permutations=1)[0]) for e in ends]


def plots(rows: list[dict], ref: list[dict], recent: list[dict], window: int) -> dict[str, str]:
    """Base64 PNGs of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    scored = [r for r in rows if r.get("mean_logprob") is not None]
    if scored:
        k = max(1, min(50, len(scored) // 10))
        lp = np.convolve([r["mean_logprob"] for r in scored], np.ones(k) / k, "valid")
        fl = np.convolve([float(r["flagged"] or 0) for r in scored], np.ones(k) / k, "valid")
        fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
        ax.plot(range(k, len(scored) + 1), lp, color="#1f6feb", label="mean logprob")
        ax.set_xlabel("request #")
        ax.set_ylabel(f"mean token logprob (rolling {k})")
        ax2 = ax.twinx()
        ax2.plot(range(k, len(scored) + 1), fl, color="#d1242f", label="flag rate")
        ax2.set_ylabel("flag rate")
        ax2.set_ylim(0, 1)
        ax.set_title("Confidence and hallucination flags over time", loc="left")
        out["confidence"] = _png(fig)
    ref_emb = [r["embedding"] for r in ref if r.get("embedding") is not None]
    series = sliding_mmd(rows, np.stack(ref_emb), min(window, 100)) if len(ref_emb) >= 5 else []
    if series:
        fig, ax = plt.subplots(figsize=(8, 3.0), dpi=110)
        t0 = series[0][0]
        ax.plot([(t - t0) / 60 for t, _ in series], [m for _, m in series], color="#8250df")
        ax.set_xlabel("minutes since the first full window")
        ax.set_ylabel("MMD² vs reference")
        ax.set_title("Prompt-embedding drift (sliding window)", loc="left")
        out["mmd"] = _png(fig)
    la = [r["prompt_chars"] for r in ref if r.get("prompt_chars") is not None]
    lb = [r["prompt_chars"] for r in recent if r.get("prompt_chars") is not None]
    if la and lb:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.0), dpi=110)
        bins = np.histogram_bin_edges(la + lb, bins=30)
        ax.hist(la, bins=bins, alpha=0.6, label="reference", density=True)
        ax.hist(lb, bins=bins, alpha=0.6, label="recent", density=True)
        ax.set_xlabel("prompt length (characters)")
        ax.legend()
        langs = sorted({r.get("language") for r in ref + recent if r.get("language")})
        x = np.arange(len(langs))
        for j, (name, rs) in enumerate((("reference", ref), ("recent", recent))):
            n = max(1, sum(1 for r in rs if r.get("language")))
            bx.bar(x + 0.4 * j, [sum(r.get("language") == g for r in rs) / n for g in langs],
                   0.4, label=name)
        bx.set_xticks(x + 0.2, langs, rotation=30)
        bx.set_ylabel("share")
        bx.legend()
        fig.suptitle("Prompt length and language", x=0.02, ha="left")
        out["prompts"] = _png(fig)
    return out


def render_html(result: dict, images: dict[str, str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {n}" for k, n in sorted(v.items()))
        return html.escape(str(v))

    rows = "".join(
        f"<tr class={'drift' if s['drift'] else 'ok'}><td>{name}</td><td>{cell(s['reference'])}"
        f"</td><td>{cell(s['recent'])}</td><td>{cell(s['p_value'])}</td>"
        f"<td>{'DRIFT' if s['drift'] else 'ok'}</td></tr>"
        for name, s in result["signals"].items())
    imgs = "".join(f'<img alt="{k}" src="data:image/png;base64,{v}">' for k, v in images.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>slm monitor</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#1f2328}}
table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #d0d7de}}
tr.drift td{{background:#ffebe9}}img{{display:block;max-width:100%;margin:1.5em 0}}</style>
</head><body><h1>Request-log monitor</h1>
<p>{html.escape(result['log'])}: {result['requests']} requests; reference
{html.escape(result['reference'])}; recent window: the last {result['recent']} requests;
alpha {result['alpha']}.</p>
<table><tr><th>signal</th><th>reference</th><th>recent</th><th>p-value</th><th></th></tr>
{rows}</table>{imgs}</body></html>
"""


def prometheus_text(result: dict) -> str:
    lines = ["# HELP slm_drift_p_value p-value of the drift test per signal (slm monitor).",
             "# TYPE slm_drift_p_value gauge"]
    for name, s in result["signals"].items():
        if s["p_value"] is not None:
            lines.append(f'slm_drift_p_value{{signal="{name}"}} {s["p_value"]:.6g}')
    lines += ["# HELP slm_drift_alarm 1 when a signal drifted (p <= alpha).",
              "# TYPE slm_drift_alarm gauge"]
    lines += [f'slm_drift_alarm{{signal="{n}"}} {int(s["drift"])}'
              for n, s in result["signals"].items()]
    emb = result["signals"]["embedding"]
    if "mmd2" in emb:
        lines += ["# HELP slm_drift_embedding_mmd2 Prompt-embedding MMD² vs the reference.",
                  "# TYPE slm_drift_embedding_mmd2 gauge", f"slm_drift_embedding_mmd2 {emb['mmd2']:.6g}"]
    return "\n".join(lines) + "\n"


def _log_of(cfg: MonitorConfig, embed):
    """The request log to read, and the temporary directory holding it (or None): ``log``
    itself, or with a MODEL the log of its answers to ``--prompts``."""
    import tempfile

    from slmkit.monitor.offline import is_request_log, looks_like_model, score_prompts
    from slmkit.monitor.text import read_prompts

    model_only = [f"--{k.replace('_', '-')}" for k in ("prompts", "max_tokens", "save_log")
                  if k in cfg.model_fields_set]
    if is_request_log(cfg.log) or not looks_like_model(cfg.log):
        if model_only:
            raise ConfigError(f"{model_only[0]} is for a MODEL; '{cfg.log}' is a request log "
                              "(drop the flag, or pass the model instead).")
        return cfg.log, None
    if not cfg.prompts:
        raise ConfigError(f"'{cfg.log}' is a model: pass --prompts FILE with the requests to "
                          "answer and score (or give the request log `slm serve "
                          "--request-log` wrote).")
    prompts = read_prompts(cfg.prompts, "--prompts")
    need = 5 if cfg.reference_file else cfg.reference + 5
    if len(prompts) < need:
        raise ConfigError(f"--prompts {cfg.prompts} holds {len(prompts)} prompts, too few for "
                          f"a reference of {cfg.reference} and a recent window; give at least "
                          f"{need}, lower --reference or pass --reference-file.")
    if cfg.save_log and Path(cfg.save_log).exists():
        raise ConfigError(f"--save-log {cfg.save_log} already exists; remove it or pick "
                          "another path.")
    scratch = tempfile.TemporaryDirectory(prefix="slm-monitor-")
    path = Path(scratch.name) / "requests.db"
    try:
        score_prompts(cfg.log, prompts, path, embed=embed, max_tokens=cfg.max_tokens)
        if cfg.save_log:
            import shutil

            out = Path(cfg.save_log)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out.with_name(out.name + ".tmp"))
            out.with_name(out.name + ".tmp").replace(out)
    except BaseException:
        scratch.cleanup()
        raise
    return str(path), scratch


def run(cfg: MonitorConfig, embed=None) -> StepResult:
    """``slm monitor`` (``embed``: MiniLM's ``texts -> [n, 384]``, for ``--reference-file``;
    the CLI passes :class:`slmkit.rag.embed.Embedder`'s, as the server logs with it)."""
    from slmkit.monitor.drift import compare
    from slmkit.monitor.log import read_rows

    t0 = time.time()
    log, scratch = _log_of(cfg, embed)
    try:
        rows = read_rows(log)
    finally:
        if scratch is not None:
            scratch.cleanup()
    if cfg.reference_file:
        if embed is None:
            raise ConfigError("--reference-file needs an embedder; run it through `slm "
                              "monitor` or pass embed=.")
        ref = reference_rows(cfg.reference_file, embed)
        embedders = {r["embedder"] for r in rows if r.get("embedding") is not None}
        if embedders - {"minilm"}:
            raise ConfigError(f"The log's prompts were embedded with {sorted(embedders)}, the "
                              "reference file with minilm; serve with --log-embedder minilm.")
        recent = rows[-cfg.window:]
        ref_label = f"{len(ref)} prompts of {cfg.reference_file}"
    else:
        if len(rows) < cfg.reference + 5:
            raise ConfigError(f"The log holds {len(rows)} requests, too few for a reference of "
                              f"{cfg.reference} and a recent window; lower --reference or "
                              "pass --reference-file.")
        ref = rows[:cfg.reference]
        recent = rows[max(cfg.reference, len(rows) - cfg.window):]
        ref_label = f"the first {cfg.reference} requests"
    signals = compare(ref, recent, alpha=cfg.alpha)
    result = {"log": cfg.log, "requests": len(rows), "reference": ref_label,
              "recent": len(recent), "alpha": cfg.alpha, "signals": signals,
              "drift": [n for n, s in signals.items() if s["drift"]]}
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(render_html(result, plots(rows, ref, recent, cfg.window)),
                       encoding="utf-8")
        tmp.replace(out)
    if cfg.prometheus:
        Path(cfg.prometheus).write_text(prometheus_text(result), encoding="utf-8")
    table = [(n, "-" if s["p_value"] is None else f"{s['p_value']:.3g}",
              "DRIFT" if s["drift"] else "ok") for n, s in signals.items()]
    return StepResult(
        "monitor", out=cfg.out,
        figures={f"p_{n}": s["p_value"] for n, s in signals.items()},
        tables=[Table("drift: reference vs recent", table, ("signal", "p-value", ""))],
        rows=[("requests", len(rows)), ("reference", ref_label),
              ("recent window", len(recent)),
              ("drifted", ", ".join(result["drift"]) or "none"),
              ("report", cfg.out or "-"), ("gauges", cfg.prometheus or "-"),
              ("seconds", f"{time.time() - t0:.1f}")],
        data=json.loads(json.dumps(result, default=float)))
