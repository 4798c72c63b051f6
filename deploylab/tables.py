"""How every lesson prints what it measured: Markdown tables and target lines.

- :func:`markdown_table` -- rows (dicts with the same keys) as a Markdown table; numeric columns
  right-aligned, floats with 4 significant digits (pre-format a value as a string to choose its
  digits);
- :func:`target_line` -- one line ``name: target X | measured Y | met`` (or ``MISSED -- reason``):
  a lesson prints its targets with the measurement, it never asserts a target.
"""

from __future__ import annotations

from numbers import Number
from typing import Any


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def _numeric(v: Any) -> bool:
    if isinstance(v, Number) and not isinstance(v, bool):
        return True
    text = str(v).strip().rstrip("%x").replace(",", "")
    try:
        float(text)
    except ValueError:
        return text in ("-", "")
    return True


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys, in the order of the first row)."""
    if not rows:
        raise ValueError("no rows for the table")
    keys = list(rows[0])
    align = ["---:" if all(_numeric(r.get(k, "")) for r in rows) else "---" for k in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def target_line(name: str, target: str, measured: str, met: bool, reason: str = "") -> str:
    """``name: target X | measured Y | met``, or ``... | MISSED -- reason`` when missed."""
    line = f"{name}: target {target} | measured {measured} | {'met' if met else 'MISSED'}"
    return line if met or not reason else f"{line} -- {reason}"
