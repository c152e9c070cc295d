"""Errors meant for people: what is wrong, where, and what to do."""

from __future__ import annotations

import errno
import os


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


def article(noun: str) -> str:
    """`noun` with its indefinite article, for messages: "an eval", "a model", "an int", "a list"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


# errors of the file system an output is written to (not of a missing or unreadable input)
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}


# a path of the wrong kind: a file where a directory is expected, or the reverse
PATH_KIND_ERRNOS = {errno.EEXIST, errno.EISDIR, errno.ENOTDIR}


def filesystem_error(e: OSError, where: str | os.PathLike | None = None) -> GdrtError | OSError:
    """A GdrtError naming the path and the cause for an OSError of the file system: an output that cannot be
    written (disk full, read-only, no permission), or a path of the wrong kind (a file given as an output
    directory, a directory given as a config file), or a path that is not there or cannot be made (ENOENT). Any
    other OSError is returned unchanged (raise it)."""
    if e.errno in PATH_KIND_ERRNOS and (e.filename or where):
        path = e.filename or where
        return GdrtError(f"{e.strerror or e}: a file where a directory is expected, or a directory where a file "
                         "is expected", path=str(path), hint="check the path given on the command line")
    if e.errno == errno.ENOENT and (e.filename or where):  # a path that is not there (or cannot be made there)
        return GdrtError(f"{e.strerror or e}", path=str(e.filename or where),
                         hint="check the path given on the command line: an output's parent folders must be creatable")
    if e.errno not in OUTPUT_ERRNOS:
        return e
    path = e.filename or where
    return GdrtError(f"cannot write: {e.strerror or e}", path=None if path is None else str(path),
                     hint="free space, or choose an output directory you can write to")
