"""Piecewise reading of a top-level JSON list: same elements as json.load, errors that name the place."""

from __future__ import annotations

import json

import pytest

from stepwise.utils.json_stream import JsonListReader, scan_list_buffer

# Elements whose strings hold everything a cut could trip on: braces, brackets, commas, escaped quotes,
# backslashes, non-ASCII text; nested objects and lists.
TRICKY = [
    {"image_id": 1, "bbox": [1.5, 2, 3e2, -4.25e-3], "score": 0.5},
    {"note": '}, {"image_id": 2', "x": [[], [{}]]},
    {"note": 'a\\"}, ', "y": "\\\\"},
    {"note": "ü,}]", "seg": {"counts": "ab}c,]", "size": [1, 2]}},
    7, "text, with } and ]", None, [1, [2, {"k": "]"}]],
]


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("block_bytes", [1, 3, 17, 1 << 20])
def test_same_elements_as_json_load_for_any_block_size(tmp_path, indent, block_bytes):
    items = TRICKY * 40
    path = tmp_path / "list.json"
    path.write_text("\n " + json.dumps(items, indent=indent, ensure_ascii=False) + " \n", encoding="utf-8")
    got, offsets = [], []
    for offset, part in JsonListReader(path, block_bytes=block_bytes):
        offsets.append(offset)
        assert offset == len(got)
        got.extend(part)
    assert got == items
    if block_bytes == 17:
        assert len(offsets) > 10  # read in pieces, not at once


def test_empty_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(" [ ] ")
    assert list(JsonListReader(path)) == []


def test_scan_finds_last_top_level_comma_and_end():
    buf = b'{"a": "x,]"}, [1, 2], "q\\"," ] tail'
    comma, end = scan_list_buffer(buf)
    assert buf[comma:comma + 2] == b", " and buf[comma - 1:comma] == b"]"
    assert buf[end:end + 1] == b"]" and buf[end + 1:] == b" tail"


@pytest.mark.parametrize("text, message", [
    ("[{not json", r"Expecting property name.*line 1 column 3 \(byte 2\)"),
    ('[1,\n2,\n]', r"Expecting value: line 3 column 1"),
    ("[,1]", r"Expecting value: line 1 column 2"),
    ("[1 2]", r"Expecting ',' delimiter"),
    ("[1] x", r"extra data after the list: line 1 column 5"),
    ('{"annotations": []}', r"expected a JSON list, found '\{'"),
    ("", r"expected a JSON list, found an empty file"),
    ('[{"a": 1}, {"a": ]', r"Expecting value: line 1 column 18"),
])
def test_invalid_json_names_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    for block_bytes in (2, 1 << 20):
        with pytest.raises(ValueError, match=message) as err:
            list(JsonListReader(path, "results file", block_bytes=block_bytes))
        assert "results file" in str(err.value) and "bad.json" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        JsonListReader(tmp_path / "nope.json", "predictions file")
