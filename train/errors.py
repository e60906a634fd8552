"""The one exception type for mistakes a user can fix by changing what they passed."""


class UserError(ValueError):
    """A bad input (file, setting, missing optional package) that the user can fix.

    Its message is one line that names the problem (and the file, where there is one);
    the command-line tools print it and exit with status 2, without a traceback. It is a
    ``ValueError`` so callers that already catch bad values keep working.
    """
