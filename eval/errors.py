"""The evaluator's one error type for a run that cannot proceed."""

from __future__ import annotations


class EvalError(Exception):
    """A run that cannot proceed; the message is one line for the user."""
