"""What every command line of the project shares: errors in one line, progress bars only on a terminal."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit code 2 (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def show_progress(disabled: bool = False) -> bool:
    """Progress bars go to stderr, and only when it is a terminal: never into a log or a pipe."""
    return not disabled and sys.stderr.isatty()
