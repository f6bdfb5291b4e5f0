"""slm eval / slm compare end to end: report files, every model present, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

MC_ITEMS = [{"id": f"q{i}", "type": "multiple_choice", "context": "def add(a, b):\n    return",
             "choices": [" a + b", " a - b", " None"], "answer": 0} for i in range(3)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_file(tmp_path):
    from slmkit.eval.tasks import write_task_file

    return write_task_file(tmp_path / "addition.jsonl", MC_ITEMS)


@pytest.fixture(scope="module")
def report(tiny_model_dirs, tmp_path_factory):
    """One comparison of three architectures, shared by the tests (a missing model is refused
    up front: tests/test_bad_inputs_io.py)."""
    from slmkit.eval.compare import compare
    from slmkit.eval.tasks import write_task_file

    tmp = tmp_path_factory.mktemp("compare")
    task = write_task_file(tmp / "addition.jsonl", MC_ITEMS)
    refs = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"]),
            str(tiny_model_dirs["mixtral"])]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = compare(refs, tmp / "report", task_specs=[str(task)], max_bytes=3000,
                      decode_tokens=4, seq_len=128)
    finally:
        torch.set_num_threads(before)
    return tmp / "report", res


def test_compare_report_contains_every_model(report):
    out, res = report
    names = {p.name for p in out.iterdir()}
    assert names == {"results.json", "report.md", "report.html", "quality_vs_size.png",
                     "quality_vs_speed.png"}
    saved = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["llama", "gpt2", "mixtral"]
    ok = saved["models"]
    for m in ok:
        s = m["summary"]
        assert m["error"] is None and s["eval_bytes"] == 3000  # same text for everyone
        assert 0 < s["bits_per_byte"] < 20 and s["decode_tok_s"] > 0
        assert 0 <= s["addition:acc"] <= 1 and m["tasks"]["addition"]["n"] == 3
    moe = ok[2]["summary"]
    assert moe["active_params"] < moe["params"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for label in ("llama", "gpt2", "mixtral"):
        assert label in md and label in page
    assert page.count("data:image/png;base64,") == 2 and "http" not in page.split("<body>")[1]
    for png in ("quality_vs_size.png", "quality_vs_speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["out"] == str(out)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--window-size=1400,1200", f"--screenshot={shot}",
                        (report[0] / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_compare_refuses_existing_out_before_work(tiny_model_dirs, tmp_path):
    from slmkit.errors import OutputError
    from slmkit.eval.compare import compare

    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        compare([str(tiny_model_dirs["llama"])], tmp_path / "taken")


@pytest.mark.slow
def test_cli_eval_json_records_metrics(cli, llama_dir, tmp_path, task_file):
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    r = cli("eval", model, "--json", "--threads", "1", "--max-bytes", "2000", "--tasks",
            task_file, "--decode-tokens", "4")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["perplexity"]["bytes"] == 2000 and res["tasks"]["addition"]["n"] == 3
    assert set(res["speed"]["prefill_tok_s"]) == {"128", "512"}
    assert res["speed"]["prefill_tok_s"]["512"] is None  # beyond the 256-token context
    metrics = json.loads((model / "slmkit.json").read_text())["metrics"]
    assert metrics["bits_per_byte"] == pytest.approx(res["perplexity"]["bits_per_byte"])
    assert "addition:acc" in metrics and metrics["decode_tok_s"] > 0


@pytest.mark.slow
def test_cli_write_tasks_then_use_them(cli, llama_dir, tmp_path):
    out = tmp_path / "tasks"
    r = cli("eval", "--tasks", "stdlib-nextline,stdlib-docstring-mc", "--task-limit", "3",
            "--write-tasks", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["stdlib-docstring-mc.jsonl",
                                                     "stdlib-nextline.jsonl"]
    lines = (out / "stdlib-nextline.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["split"] == "val"
    model = tmp_path / "model"  # a copy: eval may record its figures into the model dir
    shutil.copytree(llama_dir, model)
    r = cli("eval", model, "--no-ppl", "--no-speed", "--threads", "1",
            "--tasks", out / "stdlib-nextline.jsonl")
    assert r.returncode == 0, r.stderr
    assert "stdlib-nextline (n=3)" in r.stdout


def test_cli_bad_input_is_one_line_exit_2(cli, llama_dir, tmp_path):
    model = tmp_path / "model"  # a copy: eval may record its figures into the model dir
    shutil.copytree(llama_dir, model)
    bad_tasks = tmp_path / "bad.jsonl"
    bad_tasks.write_text(json.dumps(MC_ITEMS[0]) + "\n{\"type\": \"multiple_choice\",\n")
    cases = [
        (("eval", tmp_path / "missing-model"), "does not exist"),
        (("eval", model, "--tasks", bad_tasks), "line 2"),
    ]
    for args, needle in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_input_in_the_library(llama_dir, tmp_path):
    from slmkit.errors import ConfigError, DataError, ModelLoadError
    from slmkit.eval.evaluate import evaluate_model, resolve_tasks

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError):
        evaluate_model(llama_dir, data=str(empty), speed=False, record=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        evaluate_model(tmp_path / "nope", record=False)
    with pytest.raises(ConfigError, match="Unknown task"):
        resolve_tasks(["stdlib-nosuchtask"])
    before = json.loads((llama_dir / "slmkit.json").read_text())
    assert "bits_per_byte" not in before["metrics"]  # record=False never touched it
