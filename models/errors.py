"""The one base of user-facing errors.

`UserError` is an error in what a user asked for or gave (a flag, a file, a
bucket, weights, labels, the state of a catalogue), with a message that says
what to do. The CLI prints its message and exits with its `exit_code` (2, or 3
for a lost commit race, 4 for a damaged catalogue); any other exception is a
bug, and exits 1 with its traceback and a line asking for a report.

It lives in the lowest layer (`models/` imports nothing from `tasks/` or
`flows/`), so every layer can raise it. It is a `ValueError`, as the errors it
replaced were.
"""

from __future__ import annotations


class UserError(ValueError):
    exit_code = 2


class WeightsError(UserError):
    """Weights that cannot be used; the message says what to pass instead."""
