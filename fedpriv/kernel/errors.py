"""User-facing errors: each one becomes a single line and exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake in what the user gave us (config, data, privacy target...).

    The message must name the file or field and say what is expected.
    """

    exit_code = 2


class ConfigError(UserError):
    """Invalid configuration value, unknown key or wrong type."""


class DataError(UserError):
    """Unreadable data file, missing column, unknown label, too-small partition."""


class PrivacyError(UserError):
    """Impossible privacy target, or a budget that does not fit the plan."""


class TrainingFailed(UserError):
    """Training stopped on something the settings caused (a loss that became non-finite): exit code 1."""

    exit_code = 1


class DiskError(UserError):
    """A file that could not be written (read-only folder, full disk, lost device): its path and the errno."""
