"""palp.core.safecsv: no CSV cell a spreadsheet would evaluate, and the text comes back exactly."""

from __future__ import annotations

import csv
import io

import pandas as pd

from palp.core.safecsv import DANGEROUS, neutralise, read_csv, to_csv

HOSTILE = ['=HYPERLINK("http://evil","click")', "=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "-",
           "'=1", "''=1", "'+x", "'", "'x", "plain", "it's", "", "a=b", "1-2"]


def _table() -> pd.DataFrame:
    n = len(HOSTILE)
    return pd.DataFrame({"prompt": HOSTILE, "count": [-i for i in range(n)], "score": [-0.5 * i for i in range(n)],
                         "=header": ["a"] * n, "flag": [i % 2 == 0 for i in range(n)]})


def _raw_cells(text: str) -> list[list[str]]:
    """The cells as a spreadsheet's CSV import sees them (stdlib csv, not palp or pandas)."""
    return list(csv.reader(io.StringIO(text, newline="")))


def test_round_trip_is_exact_and_numbers_stay_numbers():
    df = _table()
    back = read_csv(to_csv(df, index=False))
    assert list(back.columns) == list(df.columns)
    assert list(back["prompt"]) == HOSTILE
    assert list(back["count"]) == list(df["count"]) and back["count"].dtype.kind == "i"
    assert list(back["score"]) == list(df["score"]) and back["score"].dtype.kind == "f"
    assert list(back["flag"]) == list(df["flag"])
    indexed = read_csv(to_csv(df.set_index("prompt")), index_col=0)  # an index of hostile labels (table2.csv)
    assert list(indexed.index) == HOSTILE
    assert read_csv(to_csv(df, index=False).encode()).equals(back)  # bytes as from storage.read_bytes


def test_no_written_cell_starts_with_a_formula_character():
    rows = _raw_cells(to_csv(_table(), index=False))
    assert len(rows) == len(HOSTILE) + 1  # a CR inside a cell did not split its row
    header, *body = rows
    assert header[3] == "'=header"
    for row in rows:
        assert not [c for c in (row[0], row[3]) if c.startswith(DANGEROUS)], row
    by_text = dict(zip(HOSTILE, (r[0] for r in body)))
    assert by_text['=HYPERLINK("http://evil","click")'] == '\'=HYPERLINK("http://evil","click")'
    assert by_text["''=1"] == "'''=1" and by_text["'x"] == "'x" and by_text["plain"] == "plain"
    assert [r[1] for r in body][1:3] == ["-1", "-2"]  # numeric columns: negative numbers as numbers


def test_neutralise_leaves_non_strings_alone():
    assert neutralise(-3) == -3 and neutralise(-1.5) == -1.5 and neutralise(True) is True
    assert neutralise("-3") == "'-3"
