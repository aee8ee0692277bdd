"""The memory figures of this process that the memory benchmarks read (Linux ``/proc/self/status``)."""

from __future__ import annotations


def status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: resident now, VmHWM: the peak resident set)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")
