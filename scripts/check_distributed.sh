#!/usr/bin/env bash
# torchrun equivalence checks on 2 CPU processes (gloo): DDP and FSDP2, full fine-tune and LoRA, with a
# stop-and-resume under FSDP. Each compares the per-step losses (out_dir/loss.jsonl) with one process
# that sees the same global batch (<= 1e-5). Includes the @slow LoRA cases the default pytest run skips.
# Run from a checkout with the package installed (pip install -e ".[dev]"); extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMNIGEN_TEST_THREADS="${OMNIGEN_TEST_THREADS:-1}"
exec python -m pytest -q -s -m "slow or not slow" tests/test_distributed.py "$@"
