"""Strict readers for JSON values: every failure is a HeaderError naming the field."""

from __future__ import annotations

import math

from .errors import HeaderError
from .spec import MAX_OFFSET


def obj(value, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise HeaderError(f"header field {where} must be an object, got {type(value).__name__}")
    missing = [k for k in required if k not in value]
    if missing:
        raise HeaderError(f"header field {where} lacks {', '.join(missing)}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise HeaderError(f"header field {where} has unknown key(s) {', '.join(map(repr, unknown))}")
    return value


def integer(value, where: str, lo: int = 0, hi: int = MAX_OFFSET) -> int:
    # bool is an int subclass in Python; a JSON true is never a valid size
    if isinstance(value, bool) or not isinstance(value, int):
        raise HeaderError(f"header field {where} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise HeaderError(f"header field {where}={value} is out of range [{lo}, {hi}]")
    return value


def number(value, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HeaderError(f"header field {where} must be a finite number, got {value!r:.40}")
    if positive and value <= 0:
        raise HeaderError(f"header field {where}={value} must be positive")
    return float(value)


def string(value, where: str) -> str:
    if not isinstance(value, str):
        raise HeaderError(f"header field {where} must be a string")
    return value


def boolean(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise HeaderError(f"header field {where} must be true or false")
    return value


def array(value, where: str) -> list:
    if not isinstance(value, list):
        raise HeaderError(f"header field {where} must be an array")
    return value


def optional(value, where: str, reader):
    return None if value is None else reader(value, where)


def shape(value, where: str, ndim: int) -> tuple[int, ...]:
    dims = array(value, where)
    if len(dims) != ndim:
        raise HeaderError(f"header field {where} must have {ndim} dimensions, got {len(dims)}")
    return tuple(integer(d, f"{where}[{i}]", lo=1, hi=2**31) for i, d in enumerate(dims))
