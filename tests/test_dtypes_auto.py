"""dtype="auto" on a CPU: bfloat16 exactly when the CPU's bfloat16 is fast and the model is wide enough."""

from __future__ import annotations

import pytest
import torch

from omnigen.util import cpu
from omnigen.util.dtypes import CPU_BF16_MIN_WIDTH, resolve_dtype

WIDE = 3072  # OmniGen-v1's hidden size
CACHED = (cpu.cpu_flags, cpu.bf16_speedup)  # the real cached functions (tests replace the attributes)


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """No forcing from the caller's environment, and no probe result cached across tests."""
    monkeypatch.delenv(cpu.ENV, raising=False)
    for function in CACHED:
        function.cache_clear()
    yield
    for function in CACHED:
        function.cache_clear()


def fake_cpu(monkeypatch, flags: set[str], speedup: float) -> list[int]:
    """Pretend the CPU has ``flags`` and the probe measures ``speedup``; returns the probe's call log."""
    calls: list[int] = []
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))

    def probe(width: int = cpu.PROBE_WIDTH, rounds: int = cpu.PROBE_ROUNDS) -> float:
        calls.append(width)
        return speedup

    monkeypatch.setattr(cpu, "bf16_speedup", probe)
    return calls


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16", "bf16"])
def test_auto_is_bfloat16_on_a_fast_bf16_cpu(monkeypatch, flag):
    calls = fake_cpu(monkeypatch, {"sse2", flag}, speedup=3.0)
    assert resolve_dtype("auto", "cpu", width=WIDE) == torch.bfloat16
    assert calls == [cpu.PROBE_WIDTH]


def test_auto_is_float32_without_bf16_flags_and_skips_the_probe(monkeypatch):
    calls = fake_cpu(monkeypatch, {"sse2", "avx2", "avx512f"}, speedup=3.0)
    assert resolve_dtype("auto", "cpu", width=WIDE) == torch.float32
    assert calls == []


def test_auto_is_float32_when_the_probe_finds_bf16_slow(monkeypatch):
    fake_cpu(monkeypatch, {"avx512_bf16"}, speedup=cpu.MIN_SPEEDUP - 0.1)
    assert resolve_dtype("auto", "cpu", width=WIDE) == torch.float32


def test_small_or_unknown_widths_stay_float32(monkeypatch):
    calls = fake_cpu(monkeypatch, {"amx_bf16"}, speedup=3.0)
    assert resolve_dtype("auto", "cpu", width=CPU_BF16_MIN_WIDTH - 1) == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert calls == []
    assert resolve_dtype("auto", "cpu", width=CPU_BF16_MIN_WIDTH) == torch.bfloat16


def test_environment_forces_both_ways(monkeypatch):
    calls = fake_cpu(monkeypatch, set(), speedup=0.5)
    monkeypatch.setenv(cpu.ENV, "1")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    fake_cpu(monkeypatch, {"amx_bf16"}, speedup=3.0)
    monkeypatch.setenv(cpu.ENV, "0")
    assert resolve_dtype("auto", "cpu", width=WIDE) == torch.float32
    assert calls == []
    monkeypatch.setenv(cpu.ENV, "yes")
    with pytest.raises(ValueError, match="OMNIGEN_CPU_BF16 must be 0 or 1.*'yes'"):
        resolve_dtype("auto", "cpu", width=WIDE)


def test_explicit_names_and_other_devices_ignore_the_cpu(monkeypatch):
    fake_cpu(monkeypatch, {"amx_bf16"}, speedup=3.0)
    assert resolve_dtype("float32", "cpu", width=WIDE) == torch.float32
    assert resolve_dtype("auto", "mps", width=WIDE) == torch.float32


def test_cpuinfo_flags_are_parsed(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    monkeypatch.setattr(cpu, "CPUINFO", info)
    assert cpu.cpu_flags() == {"fpu", "sse2", "avx512f", "avx512_bf16", "amx_tile"} and cpu.native_bf16()
    cpu.cpu_flags.cache_clear()
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert cpu.cpu_flags() == {"fp", "asimd", "sve"} and not cpu.native_bf16()
    cpu.cpu_flags.cache_clear()
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert cpu.cpu_flags() == frozenset()


def test_the_real_probe_measures_once_per_process():
    first = cpu.bf16_speedup(256)
    assert first > 0
    assert cpu.bf16_speedup(256) == first  # cached: the same float, not a second measurement
