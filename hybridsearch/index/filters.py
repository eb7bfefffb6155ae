"""Metadata filters: equality and ranges on metadata fields, compiled to a bool mask over docnos.

Syntax (all conditions must hold)::

    {"lang": "en"}                          # equality
    {"year": {"gte": 2000, "lt": 2010}}     # range: gt, gte, lt, lte
    {"tag": {"in": ["a", "b"]}, "draft": {"ne": True}}

A document without the field fails every condition on it except ``ne``. Ranges only match numbers.
Numbers in a filter must be finite, and integers within the 64-bit range (as in metadata).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

OPS = {"eq", "ne", "in", "gt", "gte", "lt", "lte"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MISSING = object()


def check_filter(flt) -> dict:
    """Validate the filter's shape; return it (None -> {})."""
    if flt is None:
        return {}
    if not isinstance(flt, dict):
        raise TypeError(f"filter must be a dict of field -> value or {{op: value}}, got {type(flt).__name__}")
    for field, cond in flt.items():
        if not isinstance(field, str):
            raise TypeError(f"filter field names must be strings, got {field!r}")
        _check_numbers(cond, f"filter on {field!r}")
        if isinstance(cond, dict):
            bad = set(cond) - OPS
            if bad or not cond:
                raise ValueError(f"filter on {field!r}: unknown operator(s) {sorted(bad)}; use {sorted(OPS)}")
            for op in ("gt", "gte", "lt", "lte"):
                if op in cond and not _is_number(cond[op]):
                    raise ValueError(f"filter on {field!r}: {op} needs a number, got {cond[op]!r}")
            if "in" in cond and not isinstance(cond["in"], (list, tuple, set)):
                raise ValueError(f"filter on {field!r}: 'in' needs a list")
    return flt


def _check_numbers(value, where: str) -> None:
    """Every number in ``value`` (nested lists and dicts included) must be finite; integers must fit
    in 64 bits, as metadata integers do (larger ones overflow the float comparisons)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            continue
        if isinstance(v, numbers.Integral):
            n = int(v)
            if not INT64_MIN <= n <= INT64_MAX:
                shown = str(n) if abs(n) < 10**30 else f"with about {n.bit_length() * 30103 // 100000 + 1} digits"
                raise ValueError(f"{where}: integer {shown} is outside the 64-bit range [-2**63, 2**63-1]")
        elif isinstance(v, numbers.Real):
            if not math.isfinite(v):
                raise ValueError(f"{where}: {v!r} is not a finite number")
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class MetadataColumns:
    """Lazily built per-field columns over a list of metadata dicts, evaluated in Python.

    The reference semantics of a filter (:func:`mask_reference`); the typed, memory-mapped
    columns of :mod:`hybridsearch.index.columns` must give the same masks, and use this for the
    fields they cannot type (mixed types, lists, dicts). ``max_fields`` bounds how many fields'
    columns are kept (least recently built first out); None keeps them all.
    """

    def __init__(self, metadata_by_docno, max_fields: int | None = None):
        self._meta = metadata_by_docno  # callable: () -> list of dicts, docno order
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._max_fields = max_fields

    def column(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """(values as object array with a sentinel for missing, numeric float64 view with NaN)."""
        if field not in self._cache:
            metas = self._meta()
            vals = np.empty(len(metas), dtype=object)
            vals[:] = [m.get(field, _MISSING) if m else _MISSING for m in metas]
            num = np.array([float(v) if _is_number(v) else np.nan for v in vals], dtype=np.float64)
            if self._max_fields is not None:
                while self._cache and len(self._cache) >= self._max_fields:
                    del self._cache[next(iter(self._cache))]
            self._cache[field] = (vals, num)
        return self._cache[field]

    def mask(self, flt: dict, n: int) -> np.ndarray:
        out = np.ones(n, dtype=bool)
        for field, cond in flt.items():
            vals, num = self.column(field)
            present = np.array([v is not _MISSING for v in vals], dtype=bool)
            if not isinstance(cond, dict):
                cond = {"eq": cond}
            for op, v in cond.items():
                if op == "eq":
                    m = present & _equals(vals, v)
                elif op == "ne":
                    m = ~(present & _equals(vals, v))
                elif op == "in":
                    m = np.zeros(n, bool)
                    for x in v:
                        m |= present & _equals(vals, x)
                else:
                    with np.errstate(invalid="ignore"):
                        m = {"gt": num > v, "gte": num >= v, "lt": num < v, "lte": num <= v}[op]
                out &= m
        return out


def _equals(vals: np.ndarray, v) -> np.ndarray:
    # Elementwise ==, but True never equals 1 and lists compare by value.
    return np.fromiter(((type(x) is type(v) or (_is_number(x) and _is_number(v))) and x == v for x in vals),
                       dtype=bool, count=len(vals))


def mask_reference(metadata_list: list[dict], flt: dict, n: int) -> np.ndarray:
    """(n,) bool: the documents of ``metadata_list`` (length n) that pass ``flt``, evaluated in
    plain Python, one document at a time. The reference semantics of every filter."""
    if len(metadata_list) != n:
        raise ValueError(f"{len(metadata_list)} metadata dicts for {n} documents")
    return MetadataColumns(lambda: metadata_list).mask(flt, n)
