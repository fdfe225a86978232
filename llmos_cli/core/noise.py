"""Third-party messages that say nothing a user of llmos can act on, filtered narrowly at their source.

Both doors (the CLI and the Python API) call `quiet_known_noise` before they load anything, and
`apply_lora` and `ModelInfo.load` before peft wraps a model (for code that calls the core directly).
"""

from __future__ import annotations

import logging
import warnings

# peft asks every model `is_gradient_checkpointing`, which transformers v5 deprecated (a FutureWarning
# on each LoRA model); the replacement is for peft to make, not for our users.
GRADIENT_CHECKPOINTING_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"
# transformers' table of weights it initialised or skipped while loading: for llmos these are the
# heads a fine-tune adds (a new classifier) or drops, decided on purpose; the CLI hides it too.
LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.integrations.peft")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def quiet_known_noise() -> None:
    """Install the filters (idempotent: a second call adds nothing)."""
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION, category=FutureWarning)
    for name in LOAD_REPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLoadReport) for f in logger.filters):
            logger.addFilter(_DropLoadReport())
