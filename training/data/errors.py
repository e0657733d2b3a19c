"""Errors and warnings about user data: messages name the file, column/line and the fix."""


class DataError(ValueError):
    """Input data or data settings that cannot be used as given."""


class DataWarning(UserWarning):
    """Input data that can be used but probably is not what the user meant."""
