"""How autoft writes durations and sizes for people: one formatter each."""

from __future__ import annotations

import math


def duration(seconds: float | None, *, column: bool = False) -> str:
    """``95`` -> ``1m35s``, ``3600`` -> ``1h``, ``7`` -> ``7s``; None -> ``-``.

    ``column=True`` writes a table cell, whose width stays steady as values grow: ``4.2s``,
    ``42s``, ``1m42s``, ``1h00m``, ``2h05m``, and nothing for None.
    """
    if seconds is None or not math.isfinite(seconds):
        return "" if column else "-"
    if column:
        if seconds < 10:
            return f"{seconds:.1f}s"
        whole = round(seconds)
        if whole < 60:
            return f"{whole}s"
        if whole < 3600:
            return f"{whole // 60}m{whole % 60:02d}s"
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs or not (hours or minutes) else "")


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"
