"""The one exception type the CLI turns into a single line on stderr (exit code 1, no traceback)."""


class UserError(Exception):
    """A mistake a user can fix or a dependency that failed: say what, where, and what to do."""
