"""``python -m eval.challenge``."""

import sys

from eval.challenge.cli import main

sys.exit(main())
