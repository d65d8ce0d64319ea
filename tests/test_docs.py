"""The reliability catalogue stays true: every row names a test, and every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_catalogue_row_names_an_existing_test():
    page = (ROOT / "docs" / "RELIABILITY.md").read_text()
    rows = [
        line
        for line in page.split("## The catalogue", 1)[1].splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:]
    assert len(rows) > 30
    for row in rows:
        named = re.findall(r"(test_\w+)::(test_\w+)|(cli_error)", row.rsplit("|", 2)[-2])
        assert named, f"a catalogue row names no test: {row[:80]}"
        for module, test, fixture in named:
            if fixture:
                continue
            source = (ROOT / "tests" / f"{module}.py").read_text()
            assert f"def {test}(" in source, f"{module}::{test} does not exist"
