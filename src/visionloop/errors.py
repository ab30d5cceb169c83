"""Errors a user can act on. The CLI prints them as one line and exits non-zero; no traceback."""


class VisionloopError(Exception):
    """Base class: the message says what is wrong and, where it can, what to do."""

    exit_code = 2


class ConfigError(VisionloopError):
    """A setting, flag or config file is invalid."""


class DataError(VisionloopError):
    """The data source is missing, unreadable, or fails the validation policy."""


class TrainingError(VisionloopError):
    """Training cannot start or resume (bad checkpoint, no device, diverged)."""


class ExportError(VisionloopError):
    """The exported model does not match the trained one, or cannot be written."""


class RegistryError(VisionloopError):
    """The MLflow store refused an operation, or a model/alias/version does not exist."""


class PipelineError(VisionloopError):
    """A pipeline run (local or on Kubeflow) ended without the result it should have produced."""


class Reported(VisionloopError):
    """A failure a training process has already reported on its own output: exit with its code, say nothing more."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("")
        self.exit_code = exit_code
