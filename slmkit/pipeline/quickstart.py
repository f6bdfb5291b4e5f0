"""``slm quickstart`` (what ``make demo`` runs): the SLM path on the built-in stdlib corpus.

No network, no set-up. Each stage writes a model dir under ``out``; a stage whose output
already exists is reused, so a second run is fast. Stages are added here as slmkit grows.
"""

from __future__ import annotations

import time
from pathlib import Path

from slmkit.console import console, human_bytes, human_count, log, print_table


def run_quickstart(out: Path, vocab_size: int = 4096) -> dict:
    """Tokenizer -> nano model -> save/load round trip -> info -> greedy generation."""
    import torch

    from slmkit.models import atomic_dir, load_model, load_tokenizer, save_model
    from slmkit.models.info import model_info
    from slmkit.models.presets import init_model
    from slmkit.models.tokenizer import stdlib_sample, train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tok_dir = out / "tokenizer"
    if not tok_dir.exists():
        log.info("1/3 training a %d-token byte-level BPE tokenizer on the stdlib", vocab_size)
        tok = train_tokenizer(stdlib_sample(max_files=120), vocab_size=vocab_size)
        with atomic_dir(tok_dir) as tmp:
            tok.save_pretrained(tmp)
    else:
        log.info("1/3 tokenizer: reusing %s", tok_dir)
    tok = load_tokenizer(tok_dir)

    model_dir = out / "nano"
    if not model_dir.exists():
        log.info("2/3 initialising the nano preset")
        model = init_model("nano", tok, seed=0)
        save_model(model, tok, model_dir, step="init",
                   params={"preset": "nano", "tokenizer": str(tok_dir)})
    else:
        log.info("2/3 nano model: reusing %s", model_dir)

    log.info("3/3 loading it back and generating")
    model, tok = load_model(model_dir)
    prompt = "def read_file(path):\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=24, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    info = model_info(model_dir, sparsity=False)
    elapsed = time.perf_counter() - t0
    print_table("slm quickstart", [
        ("tokenizer", f"{len(tok):,} tokens  ({tok_dir})"),
        ("model", f"{info['architecture']}, {human_count(info['params'])} parameters"),
        ("size on disk", human_bytes(info["size_on_disk"])),
        ("lineage", " → ".join(e["step"] for e in info["lineage"])),
        ("prompt", repr(prompt)),
        ("greedy continuation", repr(text[:80]) + "  (untrained weights)"),
        ("time", f"{elapsed:.1f} s"),
    ])
    console.print(f"Next: [bold]slm info {model_dir}[/]")
    return {"model_dir": str(model_dir), "tokenizer_dir": str(tok_dir), "text": text}
