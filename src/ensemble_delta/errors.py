"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable file).

    The message names the problem and the fix, on one line; no traceback is shown.
    """
