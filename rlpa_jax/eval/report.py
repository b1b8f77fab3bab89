"""The console table of ALOE results: turns as rows, runs as columns, then one row per AL_METRICS
entry (eval/metrics.py), the user and unscored counts, and any profile scores."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from rlpa_jax.eval.metrics import AL_METRICS
from rlpa_jax.eval.result import EvalResult


def file_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "policy"


def format_number(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(results: Sequence[EvalResult]) -> str:
    """Turns as rows and runs as columns (a 70-turn run stays readable), then the summary rows."""
    names = [f"{r.name} [{r.setting}]" for r in results]
    width = max(10, *(len(name) for name in names)) + 2
    lines = ["turn".ljust(8) + "".join(name.rjust(width) for name in names)]
    turns = max(len(r.al.per_turn) for r in results)
    for k in range(turns):
        cells = [format_number(r.al.per_turn[k], 2) if k < len(r.al.per_turn) else "" for r in results]
        lines.append(f"AL({k + 1})".ljust(8) + "".join(cell.rjust(width) for cell in cells))
    lines.append("-" * (8 + width * len(results)))
    for key, metric in AL_METRICS.items():
        lines.append(key.ljust(8) + "".join(format_number(r.al.metrics[key], metric.digits).rjust(width)
                                            for r in results))
    lines.append("users".ljust(8) + "".join(str(r.al.users).rjust(width) for r in results))
    lines.append("unscored".ljust(8) + "".join(str(sum(r.al.unscored)).rjust(width) for r in results))
    for r in results:
        for check in r.profile_scores or []:
            lines.append(f"{r.name}: profile F1x100 at turn {check['turn']}: {format_number(check['score'], 2)} "
                         f"(ceiling {format_number(check.get('ceiling'), 2)}, "
                         f"items revealed {format_number(check.get('revealed_share'), 2)}%)")
    return "\n".join(lines)
