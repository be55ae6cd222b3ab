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


def torchrun_launcher(folder: Path) -> Path:
    """A script torchrun starts in each rank: the tiny zoo registered, then ``eval.score``'s command line."""
    root = Path(__file__).resolve().parent.parent
    launcher = Path(folder) / "score_with_tiny_zoo.py"
    launcher.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from tests.tiny_zoo import install_tiny_zoo\n"
        "install_tiny_zoo()\n"
        "from eval import score\n"
        "sys.exit(score.main(sys.argv[1:]))\n"
    )
    return launcher
