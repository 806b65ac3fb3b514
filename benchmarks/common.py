"""Timing helpers shared by the benchmarks (not tests)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


# A small launcher between the benchmark and the measured command: a child started from a process that
# holds models inherits that process's high-water RSS through fork/vfork + exec on Linux (the kernel keeps
# the old memory's peak), so ru_maxrss of our own children overstates theirs. The launcher is a fresh
# interpreter of ~10 MB; its child's peak is the command's own.
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
    "sys.stderr.buffer.write(r.stderr[-2000:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(r.returncode)\n"
)


def peak_rss_of(cmd: list[str]) -> int:
    """The peak resident memory (bytes) of running `cmd`, measured as the process's own."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {r.stderr[-500:]}")
    return int(r.stdout.strip().splitlines()[-1]) * 1024     # ru_maxrss is in KiB on Linux
