"""Interactive controls for the notebooks (ipywidgets): a thin layer over tested plain functions.

:func:`decision_explorer` -- a latency-budget slider, a minimum-accuracy slider and a batch-size choice;
the table of qualifying variants (:func:`deploylab.decision.qualifying`) updates as they move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from . import decision


def _table_html(rows: Sequence[decision.Row], batch_size: int) -> str:
    if not rows:
        return "<p><b>No variant qualifies</b>: raise the latency budget or lower the minimum accuracy.</p>"
    head = "".join(f"<th>{c}</th>" for c in decision.COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{r.display()[c]}</td>" for c in decision.COLUMNS) + "</tr>" for r in rows)
    return (f"<p>{len(rows)} variant(s) qualify at batch {batch_size}, fastest first:</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def decision_explorer(rows: Sequence[decision.Row], *, budget_ms: float | None = None, min_accuracy: float | None = None,
                      batch_size: int = 1) -> Any:
    """A VBox: budget slider (ms, log scale), minimum accuracy slider (%), batch size (1 or 32), and the table.

    The widget's ``.update()`` re-renders the table (called on every change); its ``.result`` holds
    the qualifying rows of the current setting, so a cell (or a test) can read what the user sees.
    """
    import ipywidgets as w

    lat = [r.latency(b) for r in rows for b in (1, 32) if r.latency(b) is not None]
    lo, hi = (min(lat), max(lat)) if lat else (0.1, 1000.0)
    budget = w.FloatLogSlider(value=budget_ms or math.sqrt(lo * hi), base=10, min=math.log10(lo / 2), max=math.log10(hi * 2),
                              step=0.05, description="budget ms", readout_format=".2f", continuous_update=False)
    accuracy = w.FloatSlider(value=100 * (min_accuracy or 0.0), min=0.0, max=100.0, step=0.5, description="min acc %",
                             readout_format=".1f", continuous_update=False)
    batch = w.ToggleButtons(options=[("batch 1", 1), ("batch 32", 32)], value=batch_size, description="batch")
    table = w.HTML()
    box = w.VBox([w.HBox([budget, accuracy]), batch, table])

    def update(*_: Any) -> None:
        box.result = decision.qualifying(rows, latency_budget_ms=budget.value, min_accuracy=accuracy.value / 100.0,
                                         batch_size=batch.value)
        table.value = _table_html(box.result, batch.value)

    for control in (budget, accuracy, batch):
        control.observe(update, names="value")
    box.update, box.controls = update, {"budget": budget, "min_accuracy": accuracy, "batch": batch}
    update()
    return box
