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


def _parser_of(module: str) -> argparse.ArgumentParser:
    """Capture the parser a CLI builds by intercepting parse_args."""
    import importlib

    mod = importlib.import_module(module)
    captured: list[argparse.ArgumentParser] = []

    class Stop(Exception):
        pass

    def fake(self, *args, **kwargs):
        captured.append(self)
        raise Stop

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = fake
    try:
        try:
            mod.main(["--help"])
        except (Stop, SystemExit):
            pass
    finally:
        argparse.ArgumentParser.parse_args = original
    assert captured, f"{module} built no parser"
    return captured[0]


@pytest.mark.parametrize(
    "module", ["builders.make_shards", "builders.verify", "eval.score", "eval.report", "eval.zoo", "eval.demo"]
)
def test_every_cli_option_is_in_the_readme(module):
    missing = sorted(opt for opt in _options(_parser_of(module)) if f"`{opt}" not in README and f"{opt} " not in README)
    assert not missing, f"{module}: options not documented in README.md: {missing}"
