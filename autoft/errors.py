"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class AutoftError(Exception):
    """Something the user can fix: a bad path, an unknown name, unusable data."""


class PluginError(AutoftError):
    """A plugin returned or raised something autoft cannot use; the message names the plugin.

    ``kind`` and ``name`` (``"strategies"``, ``"lp-ft"``), when known, say which registered
    choice it was: a search leaves a choice whose plugin failed out of its later trials."""

    def __init__(self, message: str, *, kind: str | None = None, name: str | None = None):
        super().__init__(message)
        self.kind, self.name = kind, name
