"""What can be wrong with a catalogue, as user errors with their exit codes.
"""

from __future__ import annotations

from models.errors import UserError


class CatalogError(UserError, RuntimeError):
    """The output root holds no usable catalogue, or a version asked for is missing."""


class CatalogCorrupt(CatalogError):
    """A file the catalogue names is missing, truncated, altered or unreadable."""

    exit_code = 4  # `status --verify` names the file, rollback restores


class ConcurrentCommitError(UserError, RuntimeError):
    """Another run moved `CURRENT` while this one was running; nothing was committed."""

    exit_code = 3  # rerun to continue from the winner's version


ROLLBACK_HINT = ("`batchsight status --catalog OUT --verify` names every damaged file; "
                 "`batchsight rollback --catalog OUT --to N` makes an earlier, whole version live again")
