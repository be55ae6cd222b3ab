"""Small helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def score_cli(*argv: object) -> int:
    """``python -m eval.score`` in this process (the caller registers the tiny zoo if it uses it)."""
    from eval import score

    return score.main([str(a) for a in argv])


def read_scores(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    """``scores.csv`` by (model, variant)."""
    from eval.scores_csv import read_scores as read

    return read(Path(out))


def free_port() -> int:
    """A TCP port nothing listens on right now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
