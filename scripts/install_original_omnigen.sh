#!/usr/bin/env bash
# The original OmniGen package (1.0.3) and the versions it pins, installed into DIR without their
# dependencies, for tests/test_export_original.py (pytest -m original). DIR goes first on PYTHONPATH in a
# child process only; the project's environment (torch 2.13, transformers 5) is not touched.
# Usage: scripts/install_original_omnigen.sh [DIR]   (default: .original-omnigen in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.original-omnigen}"
if [ -f "$dir/.complete" ]; then exit 0; fi
rm -rf "$dir"
python -m pip install -q --target "$dir" --no-deps --only-binary :all: \
    "transformers==4.45.2" "tokenizers==0.20.3" "huggingface_hub==0.36.2" "diffusers==0.30.3"
# OmniGen 1.0.3 is an sdist of plain Python files: unpack its package folder instead of building it.
python -m pip download -q --no-deps --no-binary :all: -d "$dir/.sdist" "OmniGen==1.0.3"
tar -xzf "$dir"/.sdist/OmniGen-1.0.3.tar.gz -C "$dir/.sdist"
mv "$dir/.sdist/OmniGen-1.0.3/OmniGen" "$dir/OmniGen"
rm -rf "$dir/.sdist"
touch "$dir/.complete"
