class UserError(Exception):
    """A problem the user can fix (missing data, bad value). The CLI prints it as one line and exits non-zero."""
