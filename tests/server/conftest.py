import os
import subprocess
import sys
import time

import httpx
import pytest

from server_helpers import MAX_MODEL_LEN, MODEL

from qoq.server.serve import free_port


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    """`qoq serve` as a real process on a free loopback port (fp cache: outputs match qoq.generate)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    cmd = [sys.executable, "-m", "qoq.cli", "serve", MODEL, "--port", str(port), "--kv-bits", "16",
           "--page-size", "16", "--num-pages", "64", "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", "16", "--log-level", "warning"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"qoq serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qoq serve did not come up:\n{log.read_text()}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def client(server_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", timeout=120)
