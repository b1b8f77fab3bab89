"""The console table of ALOE results: turns as rows, runs as columns, then AVG, N-IR and N-R2."""

from __future__ import annotations

import math
import re


def file_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "policy"


def format_number(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(results: list[dict]) -> str:
    """Turns as rows and runs as columns (a 70-turn run stays readable), then the summary rows."""
    names = [f"{r['name']} [{r['setting']}]" for r in results]
    width = max(10, *(len(name) for name in names)) + 2
    lines = ["turn".ljust(8) + "".join(name.rjust(width) for name in names)]
    turns = max(len(r["al"]["AL"]) for r in results)
    for k in range(turns):
        cells = [format_number(r["al"]["AL"][k], 2) if k < len(r["al"]["AL"]) else "" for r in results]
        lines.append(f"AL({k + 1})".ljust(8) + "".join(cell.rjust(width) for cell in cells))
    lines.append("-" * (8 + width * len(results)))
    for key, digits in (("AVG", 2), ("N-IR", 3), ("N-R2", 3)):
        lines.append(key.ljust(8) + "".join(format_number(r["al"][key], digits).rjust(width) for r in results))
    lines.append("users".ljust(8) + "".join(str(r["al"].get("users", "?")).rjust(width) for r in results))
    lines.append("unscored".ljust(8) + "".join(str(sum(r["al"].get("unscored", []))).rjust(width) for r in results))
    for r in results:
        for check in r.get("profile_scores") or []:
            lines.append(f"{r['name']}: profile F1x100 at turn {check['turn']}: {format_number(check['score'], 2)} "
                         f"(ceiling {format_number(check.get('ceiling'), 2)}, "
                         f"items revealed {format_number(check.get('revealed_share'), 2)}%)")
    return "\n".join(lines)


