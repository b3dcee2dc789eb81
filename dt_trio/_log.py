"""What dt-trio's log lines may hold: text a client chose (instance ids, names, failure
messages) is escaped and cut before it is logged, so it can neither forge a line nor flood the
log.

Every dt-trio module takes its logger from `get_logger`, which gives it the one filter that
does this to every argument of every record; the call sites stay plain `log.info("%s", x)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

# A string argument (an instance id, say) is cut to this many characters; an exception's text,
# which quotes such strings but is dt-trio's own wording around them, to ERROR_CHARS.
STRING_CHARS = 200
ERROR_CHARS = 2000

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def loggable(text: str, limit: int = STRING_CHARS) -> str:
    """`text` on one line: control characters (and every other unprintable one) escaped as
    Python writes them, and cut to `limit` characters with a note of how many more there were."""
    if len(text) > limit:
        text = f"{text[:limit]}...[{len(text) - limit} more characters]"
    if text.isprintable():  # nearly always: no copy
        return text
    return "".join(_escape(char) for char in text)


def _loggable_arg(arg: object) -> object:
    if isinstance(arg, str):
        return loggable(arg)
    if isinstance(arg, BaseException):
        return loggable(str(arg), ERROR_CHARS)
    return arg


class _LoggableArgs(logging.Filter):
    """Makes every string and exception argument of a record `loggable` (numbers and other
    objects are left to their format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_loggable_arg(arg) for arg in args)
        elif isinstance(args, Mapping):
            record.args = {key: _loggable_arg(value) for key, value in args.items()}
        if isinstance(record.msg, str) and not record.msg.isprintable():
            record.msg = "".join(_escape(char) for char in record.msg)
        return True


_FILTER = _LoggableArgs()


def get_logger(name: str) -> logging.Logger:
    """The logger `name` (a dt-trio module's), with the filter that makes its arguments
    loggable."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
