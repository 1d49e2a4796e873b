"""``python -m fewshot`` runs the command line (torchrun launches it this way)."""

import sys

from fewshot.cli import main

sys.exit(main())
