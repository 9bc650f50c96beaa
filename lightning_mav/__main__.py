"""``python -m lightning_mav …`` is the ``mav`` command."""

from lightning_mav.commands import main

main()
