"""Errors meant for people: what is wrong, where, and what to do."""

from __future__ import annotations


class GdrtError(Exception):
    """A user-facing error. The CLI prints the message and exits with code 2.

    Build the message with `where` (a file, and optionally a line or row) so the user can find the
    problem without reading a traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, hint: str | None = None):
        self.path = path
        self.line = line
        self.hint = hint
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        text = where + message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
