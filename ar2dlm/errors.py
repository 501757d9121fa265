"""Errors that end a command with one clear message and exit code 2, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a value, a file); the message is shown as it is."""

    exit_code = 2
    label = "error"  # how the command line introduces the message
