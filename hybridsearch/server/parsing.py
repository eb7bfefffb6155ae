"""Request bodies: strict JSON (UTF-8, no NaN/Infinity, bounded nesting) for every route, and one
clear line for pydantic's validation errors (our 400s; FastAPI's 422 is never answered)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from ..index.hybrid import _check_unicode


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class StrictJSONRequest(Request):
    """A request whose ``json()`` is strict: UTF-8 only, no NaN/Infinity, bounded nesting."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
            except json.JSONDecodeError:
                raise
            except UnicodeDecodeError as e:
                raise json.JSONDecodeError(f"not UTF-8 ({e.reason} at byte {e.start})", "", 0) from e
            except RecursionError as e:
                raise json.JSONDecodeError("nested too deeply", "", 0) from e
            except ValueError as e:
                raise json.JSONDecodeError(str(e), "", 0) from e
        return self._json


class StrictRoute(APIRoute):
    """Routes whose body is parsed by :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


_TYPE_LOC = re.compile(r"^(str|int|float|bool|list|dict|none|nullable|json-or-python|union|literal|"
                       r"function-[a-z]+|constrained-[a-z]+|tagged-union)(\[.*\])?$")


def _where(loc) -> str:
    parts = [p for p in loc[1:] if not (isinstance(p, str) and (_TYPE_LOC.match(p) or "[" in p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return f"'{out}'" if out else "the body"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def validation_message(errors) -> str:
    """One clear line for pydantic's errors (the first three)."""
    msgs = []
    for e in errors:
        loc, kind, ctx = tuple(e.get("loc", ())), e.get("type", ""), e.get("ctx") or {}
        if kind == "json_invalid":
            return f"request body is not valid JSON: {ctx.get('error', 'malformed')}"
        if kind == "missing" and loc == ("body",):
            return "request body is empty; send a JSON object"
        where = _where(loc)
        if kind == "extra_forbidden":
            msgs.append(f"{where}: unknown field")
        elif kind == "missing":
            msgs.append(f"{where}: missing required field")
        elif kind == "string_unicode":  # a lone surrogate: say where, as the library does
            try:
                _check_unicode(str(e.get("input", "")), where)
                msgs.append(f"{where}: not valid Unicode")
            except ValueError as bad:
                msgs.append(str(bad))
        elif kind == "value_error":
            msgs.append(str(ctx.get("error", e.get("msg"))) if not isinstance(ctx.get("error"), str)
                        else ctx["error"])
        elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
            op = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()), "?")
            msgs.append(f"{where} must be {op} {bound}, got {_short(e.get('input'))}")
        else:
            msg = e.get("msg", "invalid")
            if where == "the body" and kind in ("model_type", "dict_type", "model_attributes_type"):
                msgs.append(f"the request body must be a JSON object, got {_short(e.get('input'))}")
            else:
                msgs.append(f"{where}: {msg[:1].lower() + msg[1:]}, got {_short(e.get('input'))}")
        if len(msgs) == 3:
            break
    seen = []
    for m in msgs:
        m = m.removeprefix("Value error, ")
        if m not in seen:
            seen.append(m)
    return "; ".join(seen) or "invalid request"
