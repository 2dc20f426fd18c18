"""The bounded readers of client input, as pure functions: JSON depth, the streaming JSON array reader,
bounded lines and CSV caps, RE2 patterns. Properties checked with hypothesis over random documents
and random read sizes (a file may hand back any number of bytes per read)."""

from __future__ import annotations

import io
import json
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import jsondepth
from appliance.config import Config
from appliance.errors import ValidationFailed
from appliance.tasks import datalimits, jsonstream, patterns

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=40
)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


class _Dribble(io.BytesIO):
    """A file whose reads return a random number of bytes (at least one), as a pipe or a socket may."""

    def __init__(self, data: bytes, seed: int):
        super().__init__(data)
        self.rng = random.Random(seed)

    def read(self, size: int = -1) -> bytes:
        return super().read(self.rng.randint(1, max(1, min(size if size > 0 else 64, 64))))


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_depth_matches_the_parsed_structure(value):
    text = json.dumps(value)
    assert jsondepth.depth(text) == _depth(value)
    assert jsondepth.depth(orjson.dumps(value)) == _depth(value)


def test_depth_check_refuses_past_the_limit_only():
    jsondepth.check(b"[" * 64 + b"]" * 64, 64)
    jsondepth.check(b'["' + b"[" * 1000 + b'"]', 64)  # brackets in a string do not nest
    jsondepth.check(b'["\\"' + b"[" * 1000 + b'"]', 64)  # nor after an escaped quote
    with pytest.raises(ValidationFailed) as err:
        jsondepth.check(b"[" * 65 + b"]" * 65, 64, field="data")
    assert err.value.code == "json_too_deep" and err.value.details == {
        "limit": 64,
        "current": 65,
        "setting": "api.json_max_depth",
        "field": "data",
    }


@settings(max_examples=150, deadline=None)
@given(records=st.lists(_values, max_size=30), seed=st.integers(0, 2**32), pretty=st.booleans())
def test_array_reader_yields_every_element_whatever_the_reads(records, seed, pretty):
    data = json.dumps(records, indent=2 if pretty else None).encode()
    got = list(jsonstream.array_records(_Dribble(data, seed), 1 << 20, 64))
    assert got == json.loads(data)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200), seed=st.integers(0, 2**32))
def test_array_reader_yields_or_raises_value_error(data, seed):
    try:
        list(jsonstream.array_records(_Dribble(data, seed), 4096, 64))
    except ValueError:
        pass


def test_array_reader_holds_one_record_at_most():
    with pytest.raises(datalimits.LimitExceeded, match=r"data_max_record_bytes"):
        list(jsonstream.array_records(io.BytesIO(b'[1, "' + b"x" * 100_000 + b'"]'), 10_000, 64))
    # numbers cut by a read boundary are not read short
    assert list(jsonstream.array_records(_Dribble(b"[12345678901234567890, 1.5e300, -7]", 1), 100, 64)) == [
        12345678901234567890,
        1.5e300,
        -7,
    ]


def test_bounded_lines_and_csv_caps():
    cfg = Config()
    cfg.queue.csv_max_columns = 3
    cfg.queue.csv_max_field_bytes = 1024
    assert list(datalimits.bounded_lines(io.BytesIO(b"a\nbb\n"), 3)) == [b"a\n", b"bb\n"]
    with pytest.raises(datalimits.LimitExceeded, match=r"\[queue\] data_max_record_bytes"):
        list(datalimits.bounded_lines(io.BytesIO(b"x" * 10), 5))
    assert list(datalimits.csv_rows(["a,b,c\n", "1,2,3\n"], cfg)) == [["a", "b", "c"], ["1", "2", "3"]]
    with pytest.raises(datalimits.LimitExceeded, match=r"\[queue\] csv_max_columns"):
        list(datalimits.csv_rows(["a,b,c,d\n"], cfg))
    with pytest.raises(datalimits.LimitExceeded, match=r"\[queue\] csv_max_field_bytes"):
        list(datalimits.csv_rows(['"' + "y" * 2000 + '"\n'], cfg))
    assert list(datalimits.csv_dicts(["a,b\n", "1\n", "1,2,3\n"], cfg)) == [{"a": "1", "b": None}, {"a": "1", "b": "2", "_extra": ["3"]}]


def test_patterns_are_linear_and_refuse_backtracking_constructs():
    assert not patterns.fullmatch("(a+)+$", "a" * 40 + "b")
    assert patterns.fullmatch("(a+)+$", "a" * 100_000)
    for bad in (r"(a)\1", "(?=a)", "(?<!a)b", "(", "x" * (patterns.MAX_PATTERN + 1)):
        with pytest.raises(patterns.PatternError):
            patterns.compile_pattern(bad)
