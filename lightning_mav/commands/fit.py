"""``mav fit / validate / test / predict --config …``: LightningCLI with the suite's defaults (``trainer_cli``)."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_mav.trainer_cli import MAVCLI


def main(argv: Sequence[str]) -> None:
    """Run a trainer command; ``argv`` starts with the subcommand (``["fit", "--config", ...]``)."""
    try:
        MAVCLI(args=list(argv))
    except Exception as e:
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(e, MissingMandatoryValue):  # `???` left in a config (paper overlays' data.urls)
            key = getattr(e, "full_key", "") or "value"
            sys.stderr.write(f"error: {key}: missing required value (`???` in the config; set it in a YAML or as "
                             f"--{key} …)\n")
            raise SystemExit(2) from None
        raise
