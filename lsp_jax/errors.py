"""The one exception type for problems a user can fix (bad input, missing files)."""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""
