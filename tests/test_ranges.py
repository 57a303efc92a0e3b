import pytest

from fleetp2p.errors import RangeInvalid
from fleetp2p.registry.ranges import parse_content_range, parse_range


@pytest.mark.parametrize("header,expected", [
    (None, None),
    ("bytes=0-1", [(0, 1)]),
    ("bytes=5-", [(5, 99)]),
    ("bytes=-10", [(90, 99)]),
    ("bytes=-1000", [(0, 99)]),
    ("bytes=90-1000", [(90, 99)]),
    ("bytes=10-19, 0-4,50-", [(10, 19), (0, 4), (50, 99)]),  # request order kept
    ("bytes=0-4,0-4", [(0, 4), (0, 4)]),  # never merged
    ("bytes=200-300,0-0", [(0, 0)]),  # unsatisfiable parts dropped
    ("items=0-1", None),  # unknown unit: ignored
    ("bytes=5-1", None),  # invalid: ignored
    ("bytes=abc", None),
    ("bytes=-", None),
])
def test_parse(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0"])
def test_unsatisfiable(header):
    with pytest.raises(RangeInvalid):
        parse_range(header, 100)


def test_empty_blob_has_no_satisfiable_range():
    with pytest.raises(RangeInvalid):
        parse_range("bytes=0-", 0)


@pytest.mark.parametrize("value,expected", [
    ("bytes 0-99/1000", (0, 99, 1000)),
    ("bytes 5-5/*", (5, 5, None)),
    ("bytes 9-3/100", None),       # last before first
    ("bytes 0-99", None),          # no total
    ("items 0-99/1000", None),
    ("", None),
    (None, None),
])
def test_parse_content_range(value, expected):
    assert parse_content_range(value) == expected
