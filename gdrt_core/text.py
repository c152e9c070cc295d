"""Which strings gdrt accepts from data, and how it shows untrusted text on a terminal.

Every string field read from a source (item titles, user ids, asins) passes `text_problem`: it must be
valid Unicode text that can be written as UTF-8, and free of control characters other than tab and
newline. Refused:

- lone UTF-16 surrogates (U+D800-U+DFFF): a `\\uXXXX` JSON escape or a Python-literal escape that decodes
  to half of a surrogate pair (an emoji cut in two), or, in U+DC80-U+DCFF, the bytes of a file that is not
  UTF-8 (decoded with `surrogateescape`). Such a string cannot be encoded: parquet, the tokenizer and the
  terminal would fail on it later;
- control characters (Unicode category Cc: NUL, ESC of ANSI escape sequences, DEL, C1 controls) except tab
  and newline, which real titles contain. NUL ends strings in C code; escape sequences rewrite the
  terminal of whoever prints a title.

`printable` shows a string with every control character and surrogate escaped (`\\x1b`, `\\n`), for output
that goes to a terminal (`gdrt recommend`).
"""

from __future__ import annotations

import re

ALLOWED_CONTROLS = "\t\n"
# Cc characters but tab and newline, and every surrogate code point
_BAD = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# the control characters `text_problem` refuses, as an RE2 pattern for pyarrow.compute (vectorised readers use
# it to send the few rows that match to `text_problem`; RE2 cannot match surrogates, which pyarrow rejects)
CONTROL_RE2 = r"[\x00-\x08\x0b-\x1f\x7f-\x{9f}]"

NON_UTF8 = "non-UTF-8 bytes"
SURROGATE = "invalid Unicode"
CONTROL = "control character"


def text_problem(text: str) -> tuple[str, str] | None:
    """(reason, detail) of the first thing that makes `text` unacceptable, or None.

    The detail reads after the name of the field: f"the title of item 3 {detail}".
    """
    match = _BAD.search(text)
    if match is None:
        return None
    char, at = match.group(), match.start()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return NON_UTF8, f"is not valid UTF-8 text (byte 0x{code - 0xDC00:02x} at character {at})"
    if 0xD800 <= code <= 0xDFFF:
        return SURROGATE, (
            f"contains a lone UTF-16 surrogate U+{code:04X} at character {at}, not valid Unicode (half of a "
            "surrogate pair, e.g. a \\u escape of half an emoji)"
        )
    return CONTROL, f"contains the control character {printable(char)} (U+{code:04X}) at character {at}"


def printable(text: str) -> str:
    """`text` with control characters and surrogates written as escapes (`\\x1b`, `\\n`, `\\ud83d`)."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
