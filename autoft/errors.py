"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class AutoftError(Exception):
    """Something the user can fix: a bad path, an unknown name, unusable data."""
