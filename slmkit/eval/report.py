"""Render compare results as ``report.md`` and a self-contained ``report.html``.

Both show one table (one row per model, failed models with their error) and each model's
lineage. The HTML inlines its CSS and the PNG plots (base64), so it is a single file that
can be mailed or attached to a PR.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from slmkit.eval.ops import pareto_front

#: (header, summary key or callable, format, lower_is_better or None when not ranked)
_COLUMNS: list[tuple[str, str, str, bool | None]] = [
    ("format", "format", "s", None),
    ("params", "params", "count", None),
    ("size", "size_on_disk", "bytes", True),
    ("bits/weight", "bits_per_weight", ".2f", True),
    ("bits/byte", "bits_per_byte", ".4f", True),
    ("ppl", "ppl", ".2f", True),
    ("prefill tok/s @128", "prefill_tok_s@128", ",.0f", False),
    ("prefill tok/s @512", "prefill_tok_s@512", ",.0f", False),
    ("decode tok/s", "decode_tok_s", ",.1f", False),
    ("TTFT ms", "ttft_ms", ",.1f", True),
    ("peak RSS (+model)", "peak_rss_bytes", "bytes", True),
]


def cell_value(model: dict[str, Any], key: str):
    s = model.get("summary") or {}
    if key == "format":
        return model.get("format")
    if key == "ttft_ms":
        return None if s.get("ttft_s") is None else 1000 * s["ttft_s"]
    return s.get(key)


def format_cell(value, spec: str, model: dict[str, Any] | None = None, key: str = "") -> str:
    from slmkit.console import human_bytes, human_count

    if value is None:
        return "–"
    if spec == "s":
        return str(value)
    if spec == "bytes":
        added = (model or {}).get("summary", {}).get("peak_rss_added_bytes")
        if key == "peak_rss_bytes" and added is not None:
            return f"{human_bytes(value)} (+{human_bytes(added)})"
        return human_bytes(value)
    if spec == "count":
        text = human_count(value)
        active = (model or {}).get("summary", {}).get("active_params")
        if key == "params" and active and active != value:
            text += f" ({human_count(active)} active)"
        return text
    return format(value, spec)


def _docs(n: int) -> str:
    return f"{n} document" + ("" if n == 1 else "s")


def columns(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """Table columns: the fixed figures plus one per task (its headline metric)."""
    cols = list(_COLUMNS)
    at = 6  # after ppl
    for name, t in (results.get("tasks") or {}).items():
        metric = t["metric"]
        cols.insert(at, (f"{name} {metric}", f"{name}:{metric}", ".3f", False))
        at += 1
    return cols


def pareto_labels(results: dict[str, Any]) -> dict[str, list[str]]:
    """``{label: ["size", "speed"]}``: on which trade-off fronts each model sits."""
    ok = [m for m in results["models"] if not m.get("error") and m.get("summary")]
    out: dict[str, list[str]] = {m["label"]: [] for m in results["models"]}
    for name, key, sign in (("size", "size_on_disk", 1), ("speed", "decode_tok_s", -1)):
        pts = [m for m in ok if m["summary"].get(key) is not None
               and m["summary"].get("bits_per_byte") is not None]
        flags = pareto_front([(sign * m["summary"][key], m["summary"]["bits_per_byte"])
                              for m in pts])
        for m, f in zip(pts, flags):
            if f:
                out[m["label"]].append(name)
    return out


def lineage_text(model: dict[str, Any]) -> str:
    """``init(preset=micro) -> train(steps=2000) -> quantize(bits=4)``."""
    parts = []
    for entry in model.get("lineage") or []:
        params = entry.get("params") or {}
        short = ", ".join(f"{k}={v}" for k, v in list(params.items())[:4]
                          if not isinstance(v, (dict, list)))
        parts.append(f"{entry.get('step') or '?'}({short})" if short else
                     str(entry.get("step") or "?"))
    return " → ".join(parts) or "–"


def render_markdown(results: dict[str, Any]) -> str:
    cols = columns(results)
    fronts = pareto_labels(results)
    lines = [f"# slm compare — {len(results['models'])} models", "",
             f"Data: `{results['data']}` split `{results['split']}`, "
             f"{results['text_bytes']:,} bytes in {_docs(results['documents'])}, "
             "scored in bits per byte (fair across tokenizers). "
             f"Created {results['created_utc']}.", "",
             "| model | Pareto | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "|".join("---:" if c[2] != "s" else "---" for c in cols) + "|"]
    for m in results["models"]:
        if m.get("error"):
            lines.append(f"| {m['label']} | | **failed:** {m['error']} |"
                         + " |" * (len(cols) - 1))
            continue
        cells = [format_cell(cell_value(m, key), spec, m, key) for _, key, spec, _ in cols]
        lines.append(f"| {m['label']} | {', '.join(fronts[m['label']])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "![quality vs size](quality_vs_size.png)",
              "![quality vs decode speed](quality_vs_speed.png)", "", "## Lineage", ""]
    for m in results["models"]:
        lines.append(f"- **{m['label']}** (`{m['model']}`): {lineage_text(m)}")
    return "\n".join(lines) + "\n"


_CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#24292f;
 margin:2rem auto;max-width:1400px;padding:0 1.5rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem}
.meta{color:#57606a;margin-bottom:1.2rem}
.wrap{overflow-x:auto;border:1px solid #d0d7de;border-radius:8px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.45rem .7rem;border-bottom:1px solid #eaeef2;white-space:nowrap}
th{background:#f6f8fa;text-align:right;font-weight:600;font-size:12px;color:#57606a;
 white-space:normal;vertical-align:bottom;max-width:7.5rem}
th:first-child,td:first-child{text-align:left}td{text-align:right}
td.s{text-align:left}tr:last-child td{border-bottom:none}
td.best{font-weight:700;color:#1a7f37}
tr.failed td{background:#fff5f5}td.err{color:#cf222e;text-align:left;white-space:normal}
.tag{display:inline-block;background:#ddf4ff;color:#0969da;border-radius:10px;
 padding:0 .5rem;margin-left:.35rem;font-size:11px;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots img{max-width:49%;min-width:420px;
 border:1px solid #d0d7de;border-radius:8px}
ul.lineage li{margin:.3rem 0}code{background:#f6f8fa;padding:.1rem .3rem;border-radius:4px}
"""


def render_html(results: dict[str, Any], images: dict[str, Path]) -> str:
    esc = html.escape
    cols = columns(results)
    fronts = pareto_labels(results)
    ok = [m for m in results["models"] if not m.get("error")]
    best: dict[str, Any] = {}
    for _, key, _, lower in cols:
        vals = [cell_value(m, key) for m in ok if cell_value(m, key) is not None]
        if lower is not None and len(set(vals)) > 1:  # a tie everywhere is no "best"
            best[key] = min(vals) if lower else max(vals)
    head = "".join(f"<th>{esc(c[0])}</th>" for c in cols)
    rows = []
    for m in results["models"]:
        tags = "".join(f'<span class="tag">{esc(f)}</span>' for f in fronts[m["label"]])
        name = f'<td class="s" title="{esc(m["model"])}"><b>{esc(m["label"])}</b>{tags}</td>'
        if m.get("error"):
            rows.append(f'<tr class="failed">{name}<td class="err" colspan="{len(cols)}">'
                        f"failed: {esc(m['error'])}</td></tr>")
            continue
        cells = []
        for _, key, spec, _ in cols:
            v = cell_value(m, key)
            cls = "s" if spec == "s" else ("best" if key in best and v == best[key] else "")
            cells.append(f'<td class="{cls}">{esc(format_cell(v, spec, m, key))}</td>')
        rows.append(f"<tr>{name}{''.join(cells)}</tr>")
    imgs = "".join(
        f'<img alt="{esc(n)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">' for n, p in images.items())
    lineage = "".join(f"<li><b>{esc(m['label'])}</b> <code>{esc(m['model'])}</code><br>"
                      f"{esc(lineage_text(m))}</li>" for m in results["models"])
    tasks = ", ".join(f"{esc(n)} ({t['n']} items, {esc(t['metric'])})"
                      for n, t in (results.get("tasks") or {}).items()) or "none"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slm compare</title>
<style>{_CSS}</style></head><body>
<h1>slm compare — {len(results['models'])} models</h1>
<div class="meta">Text: <code>{esc(str(results['data']))}</code>, split
<code>{esc(results['split'])}</code>, {results['text_bytes']:,} bytes in
{_docs(results['documents'])}, the same for every model; quality is bits per byte
(lower is better, fair across tokenizers). Tasks: {tasks}. Created
{esc(results['created_utc'])}. <b style="color:#1a7f37">Green</b>: best in column;
<span class="tag">size</span>/<span class="tag">speed</span>: Pareto-optimal.</div>
<div class="wrap"><table><thead><tr><th>model</th>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
<h2>Trade-offs</h2><div class="plots">{imgs}</div>
<h2>Lineage</h2><ul class="lineage">{lineage}</ul>
</body></html>
"""


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``."""
    from slmkit.eval.plots import write_plots

    images = write_plots(results, out_dir)
    (out_dir / "report.md").write_text(render_markdown(results), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(results, images), encoding="utf-8")
    return {**images, "report.md": out_dir / "report.md", "report.html": out_dir / "report.html"}
