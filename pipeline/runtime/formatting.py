"""How reports write numbers: a report's label, a figure, a 95% interval (shared by the report and its sections)."""
from __future__ import annotations

import math


def label(report: dict) -> str:
    """`<pirate>`, or `<nice>+<concise>` for a tag set."""
    return "+".join(report.get("tags") or [report["tag"]])


def number(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def interval(bounds, digits: int) -> str:
    """A 95% interval as `lo – hi` (n/a when the report predates intervals or it is undefined)."""
    if not bounds or any(b is None or (isinstance(b, float) and math.isnan(b)) for b in bounds):
        return "n/a"
    return f"{bounds[0]:.{digits}f} – {bounds[1]:.{digits}f}"
