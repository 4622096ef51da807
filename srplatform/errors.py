"""Errors the CLI reports as one clear line (no traceback)."""


class UserError(Exception):
    """A problem with the user's input (a path, a key, a URI) whose message says what to do."""
