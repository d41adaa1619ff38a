"""rmsprop_fused: torch.optim.RMSprop as one fused pass over all parameters.

    from rmsprop_fused import FusedRMSprop
    optimizer = FusedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)

`python -m rmsprop_fused` reports which backends are available here and why the others are not.
"""

from . import functional
from .backends import BACKENDS, unavailable_reason
from .errors import BackendUnavailableError, ExtensionUnavailableWarning, InvalidInputError, SparseGradientError
from .optimizer import FusedRMSprop
from .version import __version__

__all__ = [
    "FusedRMSprop",
    "functional",
    "BACKENDS",
    "unavailable_reason",
    "BackendUnavailableError",
    "ExtensionUnavailableWarning",
    "InvalidInputError",
    "SparseGradientError",
    "__version__",
]
