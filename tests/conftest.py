"""Test-session guards: nothing downloads weights or data."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
