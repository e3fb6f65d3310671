"""Exceptions (and the one warning category) raised by cm3_pyg.

Every error a user can cause with their own files or settings is a :class:`CM3Error`, and
its message names the file, row or key and says what was expected.
"""

from __future__ import annotations


class CM3Error(Exception):
    """Base class of all errors raised by cm3_pyg for bad input or a failed run."""


class DataFormatError(CM3Error, ValueError):
    """A data file (interactions, features, processed cache) is malformed."""


class ConfigError(CM3Error, ValueError):
    """A configuration key is unknown or has a value of the wrong type."""


class CheckpointError(CM3Error, ValueError):
    """A training checkpoint is missing, unreadable, malformed or does not fit the run."""


class RequestError(CM3Error, ValueError):
    """A forget request (unlearning) that names unknown, repeated or all of the data."""


class FolderBusyError(CM3Error, RuntimeError):
    """An output folder is held by another running process (:class:`cm3_pyg.io.FolderLock`)."""


class NonFiniteLossError(CM3Error, RuntimeError):
    """A training batch's loss is NaN or infinite; training stops.

    Attributes:
        epoch: 1-based epoch of the batch.
        batch: 1-based index of the batch within the epoch.
        num_batches: batches per epoch.
        value: the loss value (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, epoch: int, batch: int, num_batches: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at epoch {epoch}, batch {batch} of {num_batches}: training stopped"
        )
        self.epoch = epoch
        self.batch = batch
        self.num_batches = num_batches
        self.value = value


class DataWarning(UserWarning):
    """A data problem that is tolerated (e.g. dropped duplicate rows) but worth knowing."""
