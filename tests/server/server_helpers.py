"""Constants and helpers of the server tests (a module of its own: several test folders have a conftest)."""

import httpx

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 256
# The session server's engine (an offline LLM with the same settings computes the same steps).
SERVER_ENGINE_ARGS = ["--kv-bits", "16", "--page-size", "16", "--num-pages", "64", "--max-model-len",
                      str(MAX_MODEL_LEN), "--max-num-seqs", "16"]
API_KEY = "test-key-123"  # keyed_server_url's
SERVED_NAMES = ["first-name", "second-name"]
ENGINE_CONFIG = {"kv_bits": 16, "page_size": 16, "num_pages": 64, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16}


def metric(server_url: str, name: str) -> float:
    """The sum of the samples of `name` (a metric name, or a name with the start of its labels)."""
    text = httpx.get(f"{server_url}/metrics").text
    prefix = name if "{" in name else name + "{"
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total
