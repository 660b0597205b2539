"""Process memory figures the benchmarks and converters report (standard library only)."""

from __future__ import annotations

from pathlib import Path


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MB (None where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux VmHWM (ru_maxrss would include the RSS of the parent
    that forked it, which Linux carries across exec), else ru_maxrss."""
    import resource

    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now in MB (Linux VmRSS; 0 where /proc is absent)."""
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Restart the peak (VmHWM) from the current RSS, so a later peak_rss_mb covers one phase (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
