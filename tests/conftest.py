"""Test-session guards (nothing downloads weights or data) and the fixtures several test modules share."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
_TORCH_HOME = tempfile.mkdtemp(prefix="torch-home-")
os.environ["TORCH_HOME"] = _TORCH_HOME
os.environ["HF_HOME"] = os.path.join(_TORCH_HOME, "hf")
# The embedded demo writes its photos once into this cache; one per test session, never the user's.
os.environ["BGCHECK_CACHE"] = tempfile.mkdtemp(prefix="bgcheck-cache-")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def tiny_zoo():
    """The zoo plus the two tiny test rows (``tiny_a``, ``tiny_b``; see tests/tiny_zoo.py) for one test."""
    from tests.tiny_zoo import tiny_zoo_registered

    with tiny_zoo_registered() as specs:
        yield specs


@pytest.fixture
def serve():
    """``serve(folder)`` -> a :class:`tests.http_server.StaticServer` on 127.0.0.1, stopped after the test."""
    from tests.http_server import static_server

    with contextlib.ExitStack() as stack:
        yield lambda root: stack.enter_context(static_server(Path(root)))

