#!/usr/bin/env bash
# Wheels the GPU image lacks (the server's dependencies, structured output, the test tools), for
# the device machine: downloaded here into .whl/ (ignored by git), installed there by
# benchmarks/gpu_session.sh. Python 3.12, manylinux x86-64, no dependencies resolved: every
# package the image lacks is named below.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
NAMES="fastapi starlette uvicorn pydantic pydantic_core annotated_types annotated_doc typing_inspection
  typing_extensions opentelemetry_api httptools h11 click anyio sniffio idna aiohttp aiohappyeyeballs aiosignal
  attrs frozenlist multidict propcache yarl llguidance httpx httpcore certifi openai distro jiter httpx2 httpcore2 truststore"
# the versions the set-up installed here, so the GPU runs what the tests ran (unpinned if absent)
PINNED=$($PY - $NAMES <<'PY'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
PY
)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_31_x86_64 --platform any -d .whl $PINNED
ls .whl | wc -l
