"""How a command-line run ends: a mistake the user made is one line and exit code 2, not a traceback.

Used by `fastrank` (fastrank/cli.py) and every recipes/*.py script. A user error is one of
`USER_ERRORS`: a config the user wrote (`ConfigError`: unknown key, bad value, missing path), a data file
that is not valid (`DataError`), or a file or folder that is not there or not readable. Anything else is a
bug and keeps its traceback. `--debug` (anywhere on the command line) or FASTRANK_DEBUG=1 shows the
traceback of user errors too.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Sequence

from fastrank.config import ConfigError
from fastrank.data.record import DataError

DEBUG_ENV = "FASTRANK_DEBUG"
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
USER_ERROR_EXIT = 2  # what argparse uses for a bad command line


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without `--debug`, whether tracebacks were asked for by the flag or FASTRANK_DEBUG)."""
    argv = list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != "--debug"], debug


def call(main: Callable[[list[str]], int | None], argv: Sequence[str], *, prog: str = "fastrank",
         debug: bool | None = None) -> int:
    """`main(argv)`'s exit code; a user error is printed as `prog: error: ...` and gives 2."""
    argv, asked = split_debug(argv)
    debug = asked if debug is None else debug
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT


def run_entry(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
              prog: str = "fastrank") -> NoReturn:
    """For `if __name__ == "__main__":` in a script: run `main(argv)` and exit with its code."""
    sys.exit(call(main, sys.argv[1:] if argv is None else argv, prog=prog))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}"  # "[Errno 2] No such file ..." reads as noise
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["DEBUG_ENV", "USER_ERRORS", "call", "run_entry", "split_debug"]
