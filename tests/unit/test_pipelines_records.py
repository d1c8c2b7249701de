"""Streaming input reader: JSON list and JSON Lines, record positions, faults, fingerprint."""

from __future__ import annotations

import hashlib
import json

import pytest

import pipelines.records as records
from pipelines.records import InputFormatError, InputReader
from pipelines.validation import Reason


@pytest.fixture
def tiny_reads(monkeypatch):
    """Read 7 bytes at a time so records and UTF-8 sequences straddle read boundaries."""
    monkeypatch.setattr(records, "_READ_SIZE", 7)


def _values(path) -> list:
    return [r.value for r in InputReader(str(path))]


def test_json_list_streams_every_element_in_order(tmp_path, tiny_reads):
    data = [{"id": f"é{i}", "n": i, "nested": {"x": [1, 2.5, None]}} for i in range(50)] + [12345, "s", None, []]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    reader = InputReader(str(path))
    recs = list(reader)
    assert [r.value for r in recs] == data and [r.index for r in recs] == list(range(len(data)))
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert reader.nbytes == path.stat().st_size


def test_empty_json_list(tmp_path):
    (tmp_path / "e.json").write_text("  [ ]\n")
    assert _values(tmp_path / "e.json") == []


@pytest.mark.parametrize("text, where", [
    ('[{"a": 1} {"b": 2}]', "expected ','"),
    ('[{"a": 1},', "unexpected end"),
    ('[{"a": 1}] x', "after the closing"),
    ('[{"a": tru}]', "valid JSON list"),
])
def test_broken_json_list_is_an_input_error(tmp_path, text, where):
    (tmp_path / "b.json").write_text(text)
    with pytest.raises(InputFormatError, match=where):
        _values(tmp_path / "b.json")


def test_json_lines_faults_become_rejections(tmp_path, tiny_reads):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": "\xff"}\n{"id": \n{"id": "b"}')  # no final newline
    recs = list(InputReader(str(path)))
    assert [r.index for r in recs] == [0, 1, 2, 3]  # blank lines are not records
    assert recs[0].value == {"id": "a"} and recs[3].value == {"id": "b"}
    assert recs[1].error.reason == Reason.INVALID_UTF8 and "line 3" in recs[1].error.detail
    assert recs[2].error.reason == Reason.INVALID_JSON and "line 4" in recs[2].error.detail


def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        _values(tmp_path / "nope.json")
