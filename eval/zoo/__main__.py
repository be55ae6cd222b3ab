"""``python -m eval.zoo``: the CLI lives in :mod:`eval.zoo.cli` so importing the package never runs it."""

from __future__ import annotations

import sys

from eval.zoo.cli import main

sys.exit(main())
