"""Spreadsheet-safe CSV: text cells that a spreadsheet would evaluate are written as text.

Excel, LibreOffice and Google Sheets evaluate a CSV cell that starts with ``=``, ``+``, ``-``
or ``@`` (and some also after a leading tab or CR) as a formula, so a prompt such as
``=HYPERLINK("http://x","y")`` in a form, an answer key, ``samples.csv`` or ``scores.csv``
would run in whoever opens it (CSV injection). Following OWASP, such a string cell is written
with a leading apostrophe, which spreadsheets show as text and do not evaluate.

To keep this reversible, a string that already is apostrophes followed by a dangerous
character gets one more apostrophe, so :func:`read_csv` strips exactly one from every string
of the form ``'``\\ :sup:`k` + dangerous (k >= 1) and ``read_csv(to_csv(df))`` gives the text
back unchanged. Only strings are touched: numbers (including negative ones) stay numbers.
"""

from __future__ import annotations

import io

import pandas as pd

DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


def _quoted(value: str) -> bool:
    """Apostrophes (one or more) then a dangerous character: what neutralise wrote."""
    rest = value.lstrip("'")
    return len(rest) < len(value) and rest.startswith(DANGEROUS)


def neutralise(value):
    """A string that a spreadsheet would evaluate (or that looks neutralised) gets a leading ``'``."""
    if isinstance(value, str) and (value.startswith(DANGEROUS) or _quoted(value)):
        return "'" + value
    return value


def restore(value):
    """The inverse of :func:`neutralise`."""
    if isinstance(value, str) and _quoted(value):
        return value[1:]
    return value


def _is_text(dtype) -> bool:
    return dtype == object or isinstance(dtype, pd.StringDtype)  # pandas 3 reads text as "str"


def _map_text(df: pd.DataFrame, fn) -> pd.DataFrame:
    """``fn`` on every string cell, column name and index label; numeric columns as they are."""
    out = df.copy()
    for i in range(out.shape[1]):
        if _is_text(out.dtypes.iloc[i]):
            out.isetitem(i, out.iloc[:, i].map(fn))
    out.columns, out.index = _labels(out.columns, fn), _labels(out.index, fn)
    return out


def _labels(index: pd.Index, fn) -> pd.Index:
    names = [fn(n) for n in index.names]
    if isinstance(index, pd.MultiIndex):
        index = index.map(lambda t: tuple(fn(v) for v in t))
    elif _is_text(index.dtype):
        index = index.map(fn)
    return index.set_names(names)


def to_csv(df: pd.DataFrame, **kw) -> str:
    """``df.to_csv(**kw)`` as text, with every string cell (and header) neutralised."""
    safe = _map_text(df, neutralise)
    cells = [v for i in range(safe.shape[1]) if _is_text(safe.dtypes.iloc[i]) for v in safe.iloc[:, i]]
    if any(isinstance(v, str) and "\r" in v for v in [*cells, *safe.columns, *safe.index]):
        # The csv writer quotes only the characters of its line terminator: with pandas' "\n" a
        # CR inside a cell would be written bare and split the row when read back.
        kw.setdefault("lineterminator", "\r\n")
    return safe.to_csv(**kw)


def read_csv(data: bytes | str, **kw) -> pd.DataFrame:
    """Read CSV bytes or text (not a path) as palp does, undoing :func:`to_csv`'s apostrophes."""
    kw.setdefault("keep_default_na", False)
    buf = io.BytesIO(data) if isinstance(data, bytes) else io.StringIO(data)
    return _map_text(pd.read_csv(buf, **kw), restore)
