"""``python -m auxilia`` (also what ``torchrun -m auxilia`` launches)."""

from auxilia.cli import main

main()
