"""One table formatter: floats formatted, strings kept verbatim, numbers right-aligned, long cells wrapped."""
from __future__ import annotations

from fusionlib.display import format_table


def test_strings_that_look_like_numbers_stay_verbatim_and_floats_use_floatfmt():
    text = format_table(["layer", "ms", "calls"], [["01", 1.234567, 3], ["1e3", 10.0, 12]])
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "ms", "calls"]
    assert lines[2].split() == ["01", "1.235", "3"]
    assert lines[3].split() == ["1e3", "10", "12"]
    assert lines[3].endswith("12") and lines[2].endswith(" 3"), "numeric columns are right-aligned"


def test_long_cells_wrap_within_maxcolwidths():
    text = format_table(["name", "figures"], [["a", "x=1, " * 40]], maxcolwidths=[None, 30])
    assert max(len(line) for line in text.splitlines()) <= len("name") + 2 + 2 + 30
    assert len(text.splitlines()) > 3


def test_listing_shows_the_first_names_and_counts_the_rest():
    from fusionlib.display import listing

    assert listing(["a", "b"]) == "a, b"
    assert listing([f"q{i}" for i in range(10)], 3) == "q0, q1, q2, ... and 7 more"
    assert listing([f"q{i}" for i in range(10)], None).count(",") == 9
