"""``python -m eval.report``."""

from __future__ import annotations

import sys

from eval.report.cli import main

sys.exit(main())
