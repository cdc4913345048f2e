"""`qoq serve --tensor-parallel-size 2` on loopback (CPU, gloo): the HTTP answers are the
single-process engine's, and a worker rank that dies makes the server exit non-zero, not hang,
whether it dies while serving or while loading its shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from qoq.bench.random_model import bench_quant_config, bundled_config, random_model
from qoq.bench.synthetic_tokenizer import synthetic_tokenizer
from qoq.cli import main
from qoq.engine.llm import LLM
from qoq.sampling import SamplingParams
from qoq.server import engine_loop
from qoq.server.serve import free_port, wait_healthy

ENGINE_ARGS = ["--page-size", "16", "--num-pages", "64", "--max-num-seqs", "4", "--threads", "1"]
PROMPTS = ["t5 t17 t300 t999", "t1 t2 t3 t4 t5 t6 t7 t8 t9 t10"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # the synthetic tokenizer has none
EXIT_WITHIN_S = 60  # a dead worker is seen within a heartbeat (1 s); the rest is the server's own exit


@pytest.fixture
def tp_server(tmp_path):
    port = free_port()
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    cmd = [sys.executable, "-m", "qoq", "serve", "--random-weights", "tiny", "--precision", "w16a16kv16",
           "--tensor-parallel-size", "2", *ENGINE_ARGS, "--port", str(port), "--log-level", "warning",
           "--chat-template", str(template)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180)
    except RuntimeError as err:
        proc.kill()
        pytest.fail(f"{err}:\n{log.read_text()}")
    yield url, proc, log
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _workers(pid: int) -> list[int]:
    """The tensor-parallel worker processes among pid's descendants."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        child, _, args = line.strip().partition(" ")
        found += [int(child)] if "_worker_main" in args else _workers(int(child))
    return found


def _expected_texts() -> list[str]:
    config = bundled_config("tiny")
    model = random_model(config, bench_quant_config("w16a16kv16"), device="cpu", dtype=torch.float32)
    single = LLM.from_model(model, synthetic_tokenizer(config.vocab_size, config.eos_token_ids[0]), page_size=16,
                            num_pages=64, max_num_seqs=4)
    return [o.text for o in single.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))]


def _assert_answers(url: str, want: list[str]) -> None:
    for prompt, text in zip(PROMPTS, want):
        body = {"model": "random-tiny-w16a16kv16", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == text
    # Served stream: the same text
    body = {"model": "random-tiny-w16a16kv16", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want[0]


def test_tp_server_answers_as_one_process(tp_server):
    url, proc, log = tp_server
    _assert_answers(url, _expected_texts())
    # --chat-template reaches the tokenizer under tensor parallelism too
    r = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "t5 t17"}]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == [5, 17]


def test_a_torchrun_launched_server_answers_as_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m qoq serve ...` (docs/parallel.md#launching): rank 0
    serves HTTP, rank 1 follows; the answers are the single-process engine's, and stopping
    torchrun stops both."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "qoq", "serve", "--random-weights", "tiny", "--precision", "w16a16kv16", *ENGINE_ARGS,
           "--port", str(port), "--log-level", "warning"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180)
        _assert_answers(url, _expected_texts())
    except (RuntimeError, AssertionError) as err:
        raise AssertionError(f"{err}\n{log.read_text()[-3000:]}") from err
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"torchrun did not stop within 60 s of SIGTERM:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("when", ["idle", "mid-request"])
def test_a_killed_worker_makes_the_server_exit_non_zero(tp_server, when):
    url, proc, log = tp_server
    (worker,) = _workers(proc.pid)
    stream = None
    if when == "mid-request":  # a long stream under way: the kill lands between or inside its steps
        body = {"model": "random-tiny-w16a16kv16", "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        stream = httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=EXIT_WITHIN_S)
        lines = stream.__enter__().iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    os.kill(worker, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs {EXIT_WITHIN_S}s after its worker rank died:\n{log.read_text()}")
    finally:
        if stream is not None:
            try:
                list(lines)  # the stream ends (an error event, or the connection closed): never hangs
            except httpx.HTTPError:
                pass
            stream.__exit__(None, None, None)
    assert proc.returncode != 0, log.read_text()
    assert time.monotonic() - t0 < EXIT_WITHIN_S


class DyingWorkerSpec(engine_loop.ModelSpec):
    """What `qoq serve` loads, except that rank 1 exits while loading its shard (it travels,
    pickled, to the engine process and from there to the worker)."""

    def load(self, tp=None):
        if tp is not None and tp.rank == 1:
            os._exit(3)
        return super().load(tp)


def test_a_worker_that_dies_while_loading_fails_the_start_at_once(monkeypatch, capsys):
    monkeypatch.setattr(engine_loop, "ModelSpec", DyingWorkerSpec)
    t0 = time.monotonic()
    code = main(["serve", "--random-weights", "tiny", "--precision", "w16a16kv16", "--tensor-parallel-size", "2",
                 *ENGINE_ARGS, "--port", str(free_port()), "--log-level", "warning"])
    assert code == 1
    assert time.monotonic() - t0 < EXIT_WITHIN_S  # not the group's 300 s timeout
    err = capsys.readouterr().err
    assert "qoq: error: the engine process failed to start" in err
    assert "tensor-parallel rank 1 exited with code 3 while loading its shard" in err
