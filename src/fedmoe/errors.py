"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class FedMoEError(Exception):
    """A problem with the user's input (config, data, checkpoint) that the user can fix."""


class DataError(FedMoEError):
    """Missing, empty or malformed data, or a split that the data cannot satisfy."""


class CheckpointError(FedMoEError):
    """A checkpoint that is missing, unreadable or from another configuration."""


class RoundError(FedMoEError):
    """A round that cannot go on (too few surviving clients)."""


class ConfigError(FedMoEError, ValueError):
    """A config value outside its domain, or a setting that has no effect where it was given."""
