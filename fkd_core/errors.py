"""Exceptions with a reason that ends up in a report row."""


class FkdError(Exception):
    """Base class of every error fkd raises on purpose."""


class ImageError(FkdError):
    """An image could not be read or decoded; the message is the reason recorded for it."""


class RowError(FkdError):
    """A CSV row is invalid; the message names the row and the reason."""


class CheckpointError(FkdError):
    """A checkpoint is missing, unsafe or does not match its config."""
