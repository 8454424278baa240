"""Whether this CPU runs bfloat16 matmuls fast: its flags, a short cached probe, and the override.

The one home of the CPU half of ``dtype="auto"`` (``omnigen.util.dtypes.resolve_dtype``):

1. ``OMNIGEN_CPU_BF16=1`` / ``=0`` forces the answer (any other value is a ValueError naming it).
2. Otherwise the CPU must advertise native bfloat16 arithmetic: ``amx_bf16`` or ``avx512_bf16`` in the
   ``flags`` of ``/proc/cpuinfo`` (x86), ``bf16`` in its ``Features`` (Arm). Without /proc/cpuinfo
   (macOS, Windows) the answer is no.
3. And a probe must confirm it: bfloat16 and float32 matmuls of width ``PROBE_WIDTH`` with the current
   torch thread count, the best of ``PROBE_ROUNDS`` interleaved timings each; bfloat16 must be
   ``MIN_SPEEDUP`` times as fast. The probe runs once per process (about 0.15 s) and is cached.

Nothing runs at import time; the probe runs on the first question.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "OMNIGEN_CPU_BF16"
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
PROBE_WIDTH = 1024
PROBE_ROUNDS = 3
PROBED = (torch.float32, torch.bfloat16)
MIN_SPEEDUP = 1.5
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16() -> bool:
    """True when the CPU advertises bfloat16 arithmetic (AMX, AVX512-BF16 or Arm BF16)."""
    return bool(cpu_flags() & BF16_FLAGS)


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


@functools.lru_cache(maxsize=1)
def bf16_speedup(width: int = PROBE_WIDTH, rounds: int = PROBE_ROUNDS) -> float:
    """bfloat16 over float32 matmul speed at ``width`` on this CPU (measured once per process): the best
    of ``rounds`` interleaved timings of each, so a busy machine's pauses do not decide it."""
    with torch.no_grad():
        pairs = {
            dtype: (torch.randn(width, width).to(dtype), torch.randn(width, width).to(dtype))
            for dtype in PROBED
        }
        for a, b in pairs.values():
            torch.mm(a, b)  # warm-up: oneDNN picks and packs its kernel
        best = {dtype: min(_seconds(*pairs[dtype]) for _ in range(rounds)) for dtype in PROBED}
    log.debug("CPU matmul probe at %d: float32 %.4f s, bfloat16 %.4f s", width, *best.values())
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def forced_bf16() -> bool | None:
    """``OMNIGEN_CPU_BF16``: True for 1, False for 0, None when unset or empty."""
    forced = os.environ.get(ENV, "").strip()
    if forced == "":
        return None
    if forced not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1 (or unset: probe the CPU), got {forced!r}")
    return forced == "1"


def bf16_is_fast() -> bool:
    """Whether ``dtype="auto"`` may choose bfloat16 on this CPU (the rule in this module's docstring)."""
    forced = forced_bf16()
    if forced is not None:
        return forced
    return native_bf16() and bf16_speedup() >= MIN_SPEEDUP
