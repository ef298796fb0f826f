"""The one exception type the CLI turns into `training: error: ...` and exit 1."""


class TrainingError(Exception):
    """A failure the user can act on; its message is printed as a single line."""
