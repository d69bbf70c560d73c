"""The one exception type for user mistakes; the CLI prints it as one line and exits non-zero."""


class RadscribeError(Exception):
    """A problem the user can fix: the message names the file, row or field and the fix."""
