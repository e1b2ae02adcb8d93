"""User-facing errors: raised before any work, printed by the scripts as one line (no traceback)."""


class UserInputError(ValueError):
    """A config value, file or run dir the user pointed at is wrong; the message names it."""
