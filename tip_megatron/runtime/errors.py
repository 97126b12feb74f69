"""How an input error reaches the user: one line, and `--debug` for the traceback."""
from __future__ import annotations


#: set by `--debug` so torchrun ranks started from here show tracebacks too.
DEBUG_ENV = "TIP_MEGATRON_DEBUG"


def error_line(err: BaseException) -> str:
    """`error: <key or file>: <what is wrong>; <what is accepted>` on one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {text}"
