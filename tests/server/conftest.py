import os
import subprocess
import sys

import pytest

from server_helpers import MODEL, SERVER_ENGINE_ARGS

from qoq.server.serve import free_port, wait_healthy


def _serve(args: list[str], log_path):
    """Start `qoq serve ARGS` on a free loopback port; yield its URL; stop it."""
    port = free_port()
    cmd = [sys.executable, "-m", "qoq", "serve", *args, "--port", str(port), "--log-level", "warning"]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180)
    except RuntimeError as err:
        proc.kill()
        pytest.fail(f"{err}:\n{log_path.read_text()}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    """`qoq serve` as a real process on a free loopback port (fp cache: outputs match tests/reference.py)."""
    yield from _serve([MODEL, *SERVER_ENGINE_ARGS], tmp_path_factory.mktemp("server") / "serve.log")


@pytest.fixture(scope="session")
def tiny_server_url(tmp_path_factory):
    """Random weights of the tiny config, one sequence at a time, a queue of one, a 64-page cache."""
    yield from _serve(["--random-weights", "tiny", "--precision", "w16a16kv16", "--max-num-seqs", "1",
                       "--max-queue-len", "1", "--page-size", "16", "--num-pages", "64"],
                      tmp_path_factory.mktemp("tiny-server") / "serve.log")


@pytest.fixture(scope="session")
def keyed_server_url(tmp_path_factory):
    """The bundled model behind an API key, under two served names (test_api_surface.py)."""
    from server_helpers import API_KEY, SERVED_NAMES

    yield from _serve([MODEL, *SERVER_ENGINE_ARGS, "--api-key", API_KEY, "--served-model-name", *SERVED_NAMES],
                      tmp_path_factory.mktemp("keyed-server") / "serve.log")


@pytest.fixture(scope="session")
def client(server_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", timeout=120)


TOOLS_TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "hermes_tools.jinja")


@pytest.fixture(scope="session")
def tools_server_url(tmp_path_factory):
    """The session server's model and engine (a longer context: tool prompts are long) with a
    Hermes-style chat template that renders tools."""
    yield from _serve([MODEL, *SERVER_ENGINE_ARGS, "--max-model-len", "512", "--chat-template", TOOLS_TEMPLATE],
                      tmp_path_factory.mktemp("tools-server") / "serve.log")


@pytest.fixture(scope="session")
def tools_client(tools_server_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{tools_server_url}/v1", api_key="unused", timeout=120)
