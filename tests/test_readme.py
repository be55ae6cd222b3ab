"""The README tells the truth: CI runs its test line, and every CLI option is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_line():
    test_lines = [line for block in _bash_blocks(README) for line in block.splitlines() if "pytest" in line]
    assert test_lines, "README has no test command line"
    ci = (ROOT / ".ci" / "run").read_text()
    ci_line = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(ci_line) == 1
    assert ci_line[0].strip() == test_lines[0].strip()


def test_quick_start_runs_the_main_job():
    first = _bash_blocks(README)[0]
    assert "python -m eval.demo" in first and "pip install" in first


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                found.add(opt)
    return found


# Each command's options must be documented in its own section, not merely somewhere.
SECTIONS = {
    "builders.make_shards": "## Builder",
    "builders.verify": "## Sharing and verifying shards",
    "eval.score": "## Evaluator",
    "eval.challenge": "## The Backgrounds Challenge",
    "eval.report": "## Metrics and the report",
    "eval.zoo": "## The model zoo",
    "eval.demo": "## Quick start",
}


def _section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n## ", start + len(heading))
    return README[start : end if end >= 0 else len(README)]


@pytest.mark.parametrize("module", sorted(SECTIONS))
def test_every_cli_option_is_documented_in_its_section(module):
    import importlib

    section = _section(SECTIONS[module])
    options = _options(importlib.import_module(module).build_parser())
    missing = sorted(opt for opt in options if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", section))
    assert not missing, f"{module}: options not documented in README section {SECTIONS[module]!r}: {missing}"
