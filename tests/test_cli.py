"""The `qoq` command as a user runs it: a real subprocess."""

import json
import subprocess
import sys

QOQ = [sys.executable, "-m", "qoq.cli"]


def run(*args, timeout=300):
    return subprocess.run([*QOQ, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("generate", "eval", "demo"):
        assert command in out.stdout


def test_generate_chat_on_bundled_model():
    out = run("generate", "--chat", "-p", "What is the capital of France?", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "finish: stop" in out.stderr


def test_eval_ppl_prints_a_record():
    out = run("eval", "ppl", "--max-tokens", "1024", "--seq-len", "256")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["tokens"] == 4 * 255 and 5 < record["ppl"] < 60


def test_bad_inputs_get_clear_errors():
    out = run("generate", "/no/such/model", "-p", "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run("generate", "-p", "hi", "--temperature", "-1")
    assert out.returncode == 2 and "temperature must be >= 0" in out.stderr
    out = run("generate", "-p", "hi", "--max-tokens", "100000")
    assert out.returncode == 2 and "exceeds the model's context" in out.stderr
