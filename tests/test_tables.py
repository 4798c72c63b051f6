"""Markdown tables and target lines: the one way every lesson prints its measurements."""

from __future__ import annotations

import pytest

from deploylab.tables import markdown_table, target_line


def test_target_line_met_and_missed_with_its_reason():
    assert target_line("x", ">= 2", "3", True) == "x: target >= 2 | measured 3 | met"
    assert target_line("x", ">= 2", "1", False, "slow CPU") == "x: target >= 2 | measured 1 | MISSED -- slow CPU"
    assert target_line("x", ">= 2", "1", False) == "x: target >= 2 | measured 1 | MISSED"


def test_markdown_table_aligns_numbers_right_and_escapes_pipes():
    rows = [{"variant": "fp32 | eager", "p50 ms": "1.25", "images/s": 812, "accuracy": 0.91234567},
            {"variant": "int8", "p50 ms": "-", "images/s": 1900, "accuracy": 0.9}]
    assert markdown_table(rows).splitlines() == [
        "| variant | p50 ms | images/s | accuracy |",
        "|---|---:|---:|---:|",
        "| fp32 / eager | 1.25 | 812 | 0.9123 |",
        "| int8 | - | 1900 | 0.9 |",
    ]


def test_markdown_table_needs_rows():
    with pytest.raises(ValueError):
        markdown_table([])
