"""Reading JSON Lines with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[object, str]]:
    """Yield ``(parsed object, "file:line")`` for every non-blank line of ``path``.

    A UTF-8 byte-order mark on the first line is accepted. A line that is not UTF-8 or not JSON
    raises ``error("file:line: ...")``; an unreadable file raises ``error`` too.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below; errors differ
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise error(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise error(f"{where}: not valid JSON ({e})") from None
            yield obj, where
