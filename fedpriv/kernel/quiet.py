"""Silence third-party warnings and debug chatter that say nothing actionable to a fedpriv user.

Each filter names one exact message; everything else still shows.
"""

import logging
import os
import warnings

_NOISE = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"Secure RNG turned off"),  # fedpriv does not offer Opacus secure_mode (needs torchcsprng)
    (UserWarning, r"Full backward hook is firing when gradients are computed with respect to module outputs"),
    (UserWarning, r"Optimal order is the (largest|smallest) alpha"),
    (FutureWarning, r"Tip: In future versions of Ray"),
]


def quiet_third_party_warnings() -> None:
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


VERBOSE_ENV = "FEDPRIV_VERBOSE"  # set by ``fedpriv simulate --verbose``; simulation workers inherit it


def quiet_flower_debug() -> None:
    """Flower's SecAgg+ client mod logs every stage at DEBUG; keep INFO and above unless asked."""
    if not os.environ.get(VERBOSE_ENV):
        logging.getLogger("flwr").setLevel(logging.INFO)
