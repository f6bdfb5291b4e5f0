"""`slm generate` and `slm chat` through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slmkit.engine import SamplingParams, generate_text
from slmkit.models import load_model


def test_generate_greedy_streams_the_same_text_as_the_library(cli, llama_dir):
    r = cli("generate", llama_dir, "def main(", "-n", "12", "-t", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    model, tok = load_model(llama_dir)
    c = generate_text(model, tok, "def main(", SamplingParams(max_tokens=12, temperature=0,
                                                              ignore_eos=True))
    assert r.stdout.startswith("def main(" + c.text)
    assert "slm generate" in r.stdout and "decode speed" in r.stdout
    from slmkit.engine import native

    path = "native decode step" if native.load_library() is not None else "torch loop"
    assert f"{path} (static KV cache" in r.stdout


def test_generate_bad_input_is_one_line(cli, llama_dir, tmp_path):
    r = cli("generate", llama_dir, "x", "--top-p", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--top-p" in r.stderr
    r = cli("generate", tmp_path / "missing", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def _chat(model_dir, stdin: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "slmkit.cli", "chat", str(model_dir), "-n", "8",
                           "-t", "0"], input=stdin, capture_output=True, text=True, timeout=300,
                          env=env)


def test_chat_history_reset_and_exit(llama_dir):
    r = _chat(llama_dir, "hello there\nand again\n/reset\nhello there\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model>") == 3
    assert "history cleared" in r.stdout
    assert "turns" in r.stdout and "│ 3" in r.stdout.replace("┃", "│")
    replies = [line for line in r.stdout.splitlines() if "model>" in line]
    # greedy: the first turn and the turn after /reset see the same prompt, so same reply
    assert replies[0] == replies[2]


def test_chat_session_keeps_history(llama_dir):
    from slmkit.engine.chat import ChatSession

    model, tok = load_model(llama_dir)
    session = ChatSession(model, tok, SamplingParams(max_tokens=5, temperature=0))
    first = "".join(session.send("hi"))
    assert session.history == [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": first}]
    "".join(session.send("more"))
    assert len(session.history) == 4 and session.last.completion_tokens <= 5
    session.reset()
    assert session.history == []


@pytest.mark.parametrize("bad", ["--temperature=-1"])
def test_chat_rejects_bad_sampling(llama_dir, bad):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "chat", str(llama_dir), bad],
                       input="", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: Invalid --")


def test_chat_prompt_and_stop_ids(tokenizer):
    from slmkit.engine.generate import chat_stop_ids, encode_prompt

    ids = encode_prompt(tokenizer, "hi", chat=True, history=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    text = tokenizer.decode(ids)
    assert text == ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert chat_stop_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
