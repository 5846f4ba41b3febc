"""The one error type the command line turns into a one-line message."""


class FsweepError(Exception):
    """Bad input or state that the user can fix; the message names the file/row and reason."""
