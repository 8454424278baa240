"""The GPU benchmark's tiny CPU path runs end to end, so the script is ready for a GPU session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_bench_gpu_tiny_cpu_path_runs():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--tiny", "--device", "cpu", "--size", "32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("t2i", "edit"):
            rows[(parts[0], parts[1])] = parts[2:]
    for task in ("t2i", "edit"):
        for name in ("batched", "separate", "compile", "int8", "fp8", "offload_model", "diffusers"):
            assert (task, name) in rows, (task, name, out.stdout)
        # the exact modes agree with the batched run up to bf16 reordering; compile is the same graph
        for name in ("separate", "offload_model"):
            assert float(rows[(task, name)][-1]) < 0.05, rows[(task, name)]
        if rows[(task, "compile")][0] != "skipped:":
            assert float(rows[(task, "compile")][-1]) < 0.05
    assert "# total" in out.stdout


def test_bench_gpu_rejects_unknown_contenders():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--tiny", "--contenders", "batched,warp"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unknown --contenders ['warp']" in out.stderr


@pytest.mark.parametrize(
    "script", ["bench_fullsize.py", "bench_load.py", "bench_cache.py", "bench_packing.py"]
)
def test_cpu_benchmarks_parse_their_arguments(script):
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_bench_shards_smoke_times_one_and_two_processes_writing_the_same_bytes():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_shards.py"), "--smoke", "--latents"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("images", "latents"):
        median = next(line for line in out.stdout.splitlines() if line.startswith(f"{label} median:"))
        assert "2/1 = " in median and "identical output" in median, out.stdout
    assert out.stdout.count("workers 2:") == 3  # the warm-up and a round of each contest
