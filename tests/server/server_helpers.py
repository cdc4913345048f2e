"""Constants and helpers of the server tests (a module of its own: several test folders have a conftest)."""

import httpx

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 256


def metric(server_url: str, name: str) -> float:
    """The sum of the samples of `name` (a metric name, or a name with the start of its labels)."""
    text = httpx.get(f"{server_url}/metrics").text
    prefix = name if "{" in name else name + "{"
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total
