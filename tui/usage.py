"""A mistake the user can fix (a bad config, an unknown run, nothing to approve): the entry
point prints it as one line and exits with EXIT_BAD_INPUT; the commands raise it."""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""
