"""The exception tree. The CLI maps each class to a fixed exit code."""


class MpcRecError(Exception):
    """Base class: every error the product reports to a user."""

    exit_code = 1


class InputError(MpcRecError):
    """Bad user input: a data file, a flag or a configuration file."""

    exit_code = 2


class DataError(InputError):
    """A ratings or catalogue file that cannot be used (names file, line and problem)."""


class ConfigError(InputError):
    """A party configuration or option that is invalid or inconsistent."""


class PeerError(MpcRecError):
    """Another party failed, timed out, disconnected or sent something invalid."""

    exit_code = 3
