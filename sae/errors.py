"""Errors the scripts print as one line (no traceback): the message says what, where and the fix."""


class ReportedError(Exception):
    """A run stopped for a reason its message explains in one line (bad input, a full disk, divergence)."""


class UserInputError(ReportedError, ValueError):
    """A config value, file or run dir the user pointed at is wrong; the message names it."""
