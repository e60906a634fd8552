"""Errors that the user can fix (bad input), as opposed to bugs."""


class UserError(ValueError):
    """Bad input from the user (a flag, a path, a file's content).

    The message is one line that names the problem and what to do; ``python -m train``
    prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
