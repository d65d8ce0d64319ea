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


def test_results_tables_are_the_ones_the_json_gives():
    # docs/RESULTS.md's tables are generated (experiments/tables.py), never typed by hand.
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import tables

    page = (ROOT / "docs" / "RESULTS.md").read_text()
    assert page.count("<!-- table:") == len(tables.TABLES) and "| 250,000 |" in page
    assert tables.render(page) == page, "docs/RESULTS.md is out of date: run `python experiments/tables.py`"
