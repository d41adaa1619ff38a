"""Exceptions and warnings raised by rmsprop_fused."""


class ExtensionUnavailableWarning(UserWarning):
    """The compiled extension is missing or stale; a slower backend is used instead."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot update a (device, dtype) group here."""


class InvalidInputError(ValueError):
    """A tensor handed to a step does not fit its param (device, dtype, shape, layout).

    ``index`` is the position in the lists given to :func:`rmsprop_fused.functional.rmsprop`;
    :class:`rmsprop_fused.FusedRMSprop`'s messages name the param group and the param instead.
    """

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class SparseGradientError(InvalidInputError, RuntimeError):
    """A sparse gradient (a RuntimeError with torch.optim's message, for compatibility)."""
