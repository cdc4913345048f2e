"""The `qoq` command as a user runs it: a real subprocess."""

import json
import subprocess
import sys

import pytest

QOQ = [sys.executable, "-m", "qoq"]


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


def test_generate_streams_text_without_the_stop_string():
    """The engine's detokenizer holds back what may start a stop string: the terminal never shows
    it (the dense generator printed every token and cut the stop string only from its return value)."""
    out = run("generate", "--chat", "-p", "Count from 1 to 10, separated by commas.", "--max-tokens", "40",
              "--stop", "5")
    assert out.returncode == 0, out.stderr
    assert "4" in out.stdout and "5" not in out.stdout
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
    out = run("generate", "-p", "hi", "--max-tokens", "100000")  # the engine's own check, before any step
    assert out.returncode == 2 and "maximum context length is 8192 tokens" in out.stderr


def test_user_errors_are_one_line_not_tracebacks(tmp_path):
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_text("not a GGUF file\n" * 100)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    cases = [
        (("eval", "ppl", "--seq-len", "0"), "seq_len >= 2"),
        (("eval", "ppl", str(bad_gguf)), "not a readable GGUF file"),
        (("eval", "ppl", str(partial)), "lacks num_attention_heads"),
        (("generate", "-p", "hi", "--device", "tpu"), "pass cpu or cuda"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((("generate", "-p", "hi", "--device", "cuda"), "needs a CUDA GPU"))
    for args, message in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_quantize_then_eval_and_generate_a_tiny_hf_model(tmp_path, bundled):
    """`qoq quantize` on an HF folder, then the packed checkpoint through `eval ppl` and `generate`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = bundled
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    src, out_dir = tmp_path / "tiny-hf", tmp_path / "tiny-qoq"
    LlamaForCausalLM(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = run("quantize", str(src), "--out", str(out_dir), "--precision", "w4a8kv4", "--group-size", "128",
              "--calib-seqs", "4", "--calib-seq-len", "128", "--rotation", "auto")
    assert out.returncode == 0, out.stderr
    assert "rotation auto:" in out.stderr + out.stdout
    assert (out_dir / "quant_config.json").exists() and (out_dir / "model.safetensors").exists()
    assert json.loads((out_dir / "quant_config.json").read_text())["qk_hadamard"]  # on by default for KV4
    out = run("eval", "ppl", str(out_dir), "--max-tokens", "512", "--seq-len", "128")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["tokens"] == 4 * 127 and record["ppl"] > 1  # a random model: any finite perplexity
    out = run("generate", str(out_dir), "-p", "Hello", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    out = run("quantize", str(src), "--out", str(tmp_path / "x"), "--rotation", "auto", "--no-rotation")
    assert out.returncode == 2 and "contradict" in out.stderr


def test_every_option_has_help_text():
    import argparse

    from qoq.cli import build_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers(build_parser()) for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing
    serve_help = run("serve", "--help").stdout
    assert "--api-key" in serve_help and "--threads" in serve_help


def test_serve_on_a_busy_port_says_so_before_loading():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("serve", "--port", str(port), timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"qoq: error: cannot listen on 127.0.0.1:{port}: Address already in use; another server may be using "
        "the port: stop it or pass --port"]


def test_threads_option():
    out = run("eval", "ppl", "--threads", "0")
    assert out.returncode == 2 and "--threads must be >= 1" in out.stderr
    out = run("eval", "ppl", "--threads", "1", "--max-tokens", "256", "--seq-len", "128")
    assert out.returncode == 0, out.stderr


def _terminal_sigint() -> None:
    """In the child: Ctrl-C's disposition in a terminal, whatever this process inherited (a shell
    starts background jobs with SIGINT ignored, and an ignored SIGINT passes on through exec)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_with_130_and_no_traceback():
    """Ctrl-C goes to the terminal's whole process group (the server's engine process too)."""
    import os
    import signal
    import time

    import httpx

    from qoq.server.serve import free_port

    port = free_port()
    commands = [(["serve", "--random-weights", "tiny", "--precision", "w16a16kv16", "--port", str(port)],
                 lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200),
                (["eval", "ppl"], lambda: True)]
    for args, ready in commands:
        proc = subprocess.Popen([*QOQ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_terminal_sigint)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ready():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(2)  # into the long work
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().endswith("qoq: interrupted"), err


def test_ctrl_c_during_the_imports_ends_with_130():
    """Early Ctrl-Cs land while torch imports, where CPython marks a caught KeyboardInterrupt as
    unhandled and would end the process by SIGINT (-2) after 'qoq: interrupted'."""
    import os
    import signal
    import time

    for delay in (0.4, 0.7, 1.0, 1.5):
        proc = subprocess.Popen([*QOQ, "eval", "ppl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_terminal_sigint)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and err.strip().endswith("qoq: interrupted"), (delay, proc.returncode, err)


def test_ctrl_c_inside_a_finalizer_is_not_lost():
    """Python drops a KeyboardInterrupt raised in __del__ ("Exception ignored in"); the command's
    handler asks again once the finalizer has returned."""
    import os
    import signal
    import time

    from qoq import interrupts

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the signal is handled here, inside __del__

    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            Finalized()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts._fired = False  # this process goes on running tests


def test_a_ctrl_c_that_a_library_turned_into_an_error_ends_with_130(monkeypatch, capsys):
    """transformers' lazy imports report a Ctrl-C inside them as a module that could not be
    imported (from a RecursionError, the KeyboardInterrupt gone from the chain): after the handler
    fired, any error is the interruption."""
    import argparse
    import signal

    from qoq import cli, interrupts

    def command(args):
        if args.ctrl_c:
            try:
                interrupts.handler(signal.SIGINT, None)
            except KeyboardInterrupt:
                pass  # swallowed inside the library
        raise cli.LoadError("tokenizer: cannot load a tokenizer (Could not import module 'PreTrainedTokenizerFast')")

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(func=command, threads=None, ctrl_c=argv == ["ctrl-c"])

    monkeypatch.setattr(cli, "build_parser", Parser)
    monkeypatch.setattr(interrupts, "_fired", False)
    assert cli.main(["ctrl-c"]) == 130
    assert capsys.readouterr().err.strip() == "qoq: interrupted"
    monkeypatch.setattr(interrupts, "_fired", False)
    assert cli.main([]) == 2  # the same error with no Ctrl-C is reported as such
    assert "cannot load a tokenizer" in capsys.readouterr().err
