"""tasks.serve's JSON decoding: the vectorised reader of `{"inputs": <patches>}` is exact and never more lenient than
the standard parser. Each body it does not take is left to the general parser, which refuses it with the same message
as before; bodies are full-size patches, so every case crosses the reader's chunks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tasks.lib.errors import RequestError
from tasks.lib.tiles import PATCH_SHAPE
from tasks.serve import _fast_json, patches_from_json

FIRST, LAST = 4321, 1234  # the first and last values of the patches below: where the edge cases are written


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    """Two patches over the whole uint16 range, with every length of number (1 to 5 digits) and both extremes."""
    array = np.random.default_rng(5).integers(0, 65536, size=(2, *PATCH_SHAPE), dtype=np.uint16)
    array.flat[1:9] = [0, 7, 10, 99, 100, 65535, 10000, 9]
    array.flat[0], array.flat[-1] = FIRST, LAST
    return array


@pytest.fixture(scope="module")
def body(patches) -> bytes:
    return json.dumps({"inputs": patches.tolist()}).encode()


def _edit(body: bytes, where: str, number: bytes) -> bytes:
    """The body with its first or last number written as `number` (any text)."""
    if where == "first":
        return body.replace(b"[[[[%d," % FIRST, b"[[[[" + number + b",", 1)
    return body.replace(b"%d]]]]}" % LAST, number + b"]]]]}", 1)


@pytest.mark.parametrize(
    "dump",
    [
        lambda p: json.dumps({"inputs": p.tolist()}),
        lambda p: json.dumps({"instances": p.tolist()}, separators=(",", ":")),
        lambda p: json.dumps({"inputs": p.tolist()}, indent=1),
        lambda p: "\r\n\t " + json.dumps({"inputs": p.tolist()}, indent="\t").replace("\n", "\r\n") + " \n",
        lambda p: json.dumps({"inputs": p[:1].tolist()}),
    ],
    ids=["default", "compact, instances", "indented", "tabs and CRLF", "one patch"],
)
def test_the_fast_reader_is_exact_on_any_json_layout(patches, dump):
    text = dump(patches)
    (standard,) = json.loads(text).values()  # what the standard parser reads
    got = _fast_json(text.encode())
    assert got is not None and got.dtype == np.uint16
    np.testing.assert_array_equal(got, np.asarray(standard, dtype=np.int64))


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize(
    ("number", "status", "phrase"),
    [
        (b"-1", 422, "values from -1"),
        (b"+1", 400, "malformed JSON"),
        (b"1.0", 422, "non-integer"),
        (b"1e3", 422, "non-integer"),
        (b"NaN", 422, "NaN"),
        (b"007", 400, "malformed JSON"),  # JSON has no leading zeros
        (b"1 2", 400, "malformed JSON"),  # two numbers in one place
        (b"", 400, "malformed JSON"),  # an empty element
        (b"\x0c1", 400, "malformed JSON"),  # a form feed is no JSON blank
        (b'"1"', 422, "strings"),
        (b"65536", 422, "values from 0 to 65536"),
        (b"100000", 422, "values from 0 to 100000"),
        (b"12345678901234567890", 422, "65535"),
        (b"[1]", 422, "rectangular"),  # ragged: one value a list
    ],
)
def test_what_the_fast_reader_does_not_take_is_refused_as_before(body, where, number, status, phrase):
    edited = _edit(body, where, number)
    assert edited != body
    if number not in (b"65536",):
        assert _fast_json(edited) is None  # left to the general parser
    with pytest.raises(RequestError, match=re.escape(phrase)) as refused:
        patches_from_json(edited)
    assert refused.value.status == status


def test_zero_alone_is_a_number(body, patches):
    expected = patches.copy()
    expected.flat[0] = 0
    np.testing.assert_array_equal(_fast_json(_edit(body, "first", b"0")), expected)


@pytest.mark.parametrize(
    ("text", "status", "phrase"),
    [
        (b'{"inputs": []}', 422, "empty batch"),
        (b'{"inputs": [[[[1, 2, 3]]]]}', 422, "shape (1, 1, 1, 3)"),
        (b'{"inputs": [[[[1, 2, 3]]], [[[4, 5]]]]}', 422, "rectangular"),
        (b'{"inputs": [[[[1, 2, 3]]]}', 400, "malformed JSON"),
        (b'{"inputs": 5}', 422, "array of patches"),
    ],
)
def test_small_and_broken_bodies_go_to_the_general_parser(text, status, phrase):
    assert _fast_json(text) is None
    with pytest.raises(RequestError, match=re.escape(phrase)) as refused:
        patches_from_json(text)
    assert refused.value.status == status


def test_a_shape_that_is_not_whole_patches_is_left_to_the_general_parser(patches):
    cases = {
        "4 bands": np.zeros((1, 120, 120, 4), np.uint16),
        "wrap it in a list": patches[0],
        "shape (1, 120, 119, 3)": patches[:1, :, :119],
    }
    for phrase, array in cases.items():
        text = json.dumps({"inputs": array.tolist()}).encode()
        assert _fast_json(text) is None
        with pytest.raises(RequestError, match=re.escape(phrase)):
            patches_from_json(text)


def test_other_keys_take_the_general_parser_with_the_same_answer(body, patches):
    with_bands = body[:-1] + b', "bands": ["B04", "B03", "B02"]}'
    assert _fast_json(with_bands) is None
    np.testing.assert_array_equal(patches_from_json(with_bands), patches)
    np.testing.assert_array_equal(patches_from_json(body), patches)
