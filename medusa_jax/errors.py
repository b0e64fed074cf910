"""The one exception type users see.

Every problem a user can cause (a missing file, a bad flag, a tree the heads cannot serve) raises `MedusaError`
with a single line that names the problem and the fix. The CLIs print that line and exit with status 2 instead
of a traceback (see `cli_errors`).
"""

from __future__ import annotations

import contextlib
import sys


class MedusaError(ValueError):
    """A user-facing error whose message is one line naming the problem and the fix."""


@contextlib.contextmanager
def cli_errors():
    """Turns a MedusaError (and Ctrl-C) into one line on stderr and a non-zero exit status."""
    try:
        yield
    except MedusaError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def int_list(text: str, flag: str, minimum: int) -> list[int]:
    """A comma-separated command-line value as integers >= `minimum`; a one-line `MedusaError` otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise MedusaError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if min(values) < minimum:
        raise MedusaError(f"{flag} values must be >= {minimum}, got {text!r}")
    return values
