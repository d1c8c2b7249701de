"""Stream the records of a LLaVA-style input file, one at a time, with their input position.

Two layouts are accepted and told apart by the first non-blank byte: a JSON list
(``[{...}, {...}]``, LLaVA's own format) or JSON Lines (one object per line). Neither is loaded
whole: the list is parsed element by element with :meth:`json.JSONDecoder.raw_decode` over a
growing text window, lines are split from fixed-size reads. The file's SHA-256 is computed on
the way (the input fingerprint in the shard manifest).

Text encoding: UTF-8, with or without a byte-order mark (the BOM is skipped). UTF-16 and UTF-32
files (recognised by their BOM or by the NUL bytes of ASCII text in them) raise
:class:`InputFormatError` saying how to convert them; they are not guessed at. A top-level JSON
*object* (``{"data": [...]}``, or one record pretty-printed over several lines) is neither
layout and raises :class:`InputFormatError` naming the expected one.

A JSON Lines line that is not UTF-8 or not JSON becomes a record carrying a
:class:`~pipelines.validation.Rejection` (it is quarantined, the build goes on). A JSON list is
one document: if it is broken the whole input is unusable, so that raises
:class:`InputFormatError` naming the byte offset.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mocha.io import storage
from pipelines.validation import Reason, Rejection

_READ_SIZE = 1 << 20
_WHITESPACE = " \t\r\n"


class InputFormatError(ValueError):
    """The input file is not a JSON list or JSON Lines document."""


@dataclass
class InputRecord:
    """One input element: its 0-based position and either the parsed value or why it failed."""

    index: int
    value: Any = None
    error: Rejection | None = None


@dataclass
class _HashingReader:
    stream: BinaryIO
    sha256: Any = field(default_factory=hashlib.sha256)
    nbytes: int = 0

    def read(self, n: int = _READ_SIZE) -> bytes:
        chunk = self.stream.read(n)
        self.sha256.update(chunk)
        self.nbytes += len(chunk)
        return chunk


class InputReader:
    """Iterate ``InputRecord``s of ``url``; after iteration ``sha256`` and ``nbytes`` are set."""

    def __init__(self, url: str):
        self.url = url
        self.sha256: str | None = None
        self.nbytes = 0

    def __iter__(self) -> Iterator[InputRecord]:
        if not storage.exists(self.url):
            raise FileNotFoundError(f"input file not found: {self.url}")
        with storage.open_input(self.url) as raw:
            reader = _HashingReader(raw)
            head = reader.read()
            _check_encoding(head, self.url)
            if head.startswith(_UTF8_BOM):
                head = head[len(_UTF8_BOM):]
            first = head.lstrip()[:1]
            if first == b"[":
                yield from _json_list(reader, head, self.url)
            else:
                yield from _checked_json_lines(_json_lines(reader, head), head, self.url)
            while reader.read():  # hash any bytes the parser did not need (trailing blanks)
                pass
        self.sha256 = reader.sha256.hexdigest()
        self.nbytes = reader.nbytes


_UTF8_BOM = codecs.BOM_UTF8
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_EXPECTED_LAYOUT = ("expected a JSON list of records ([{\"id\": ..., \"conversations\": [...]}, ...], LLaVA's "
                    "format) or JSON Lines (one record object per line)")


def _check_encoding(head: bytes, url: str) -> None:
    """Refuse UTF-16/32 text (BOM, or the NUL bytes ASCII has in those encodings)."""
    encoding = next((name for bom, name in _WIDE_BOMS if head.startswith(bom)), None)
    if encoding is None and b"\x00" in head[:64]:
        encoding = "UTF-16 or UTF-32"
    if encoding is not None:
        raise InputFormatError(f"{url}: the file is {encoding} text; the input must be UTF-8. Convert it, e.g. "
                               f"`iconv -f UTF-16 -t UTF-8 IN > OUT` (for UTF-16)")


def _checked_json_lines(records: Iterator[InputRecord], head: bytes, url: str) -> Iterator[InputRecord]:
    """JSON Lines, after making sure the file is not a top-level JSON object instead: one
    pretty-printed over several lines, or one line holding a list of records under a key."""
    if head.lstrip()[:1] == b"{":
        try:
            value, end = json.JSONDecoder().raw_decode(head.decode("utf-8", errors="replace").lstrip())
        except json.JSONDecodeError:
            value, end = None, 0
        text = head.decode("utf-8", errors="replace").lstrip()
        first_line = text.split("\n", 1)[0].strip()
        if (isinstance(value, dict) and "\n" in text[:end]) or first_line == "{":
            raise InputFormatError(f"{url}: the file is one JSON object spanning several lines; {_EXPECTED_LAYOUT}")
    for rec in records:
        if rec.index == 0 and isinstance(rec.value, dict) and "conversations" not in rec.value:
            lists = [k for k, v in rec.value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            if lists:
                raise InputFormatError(f"{url}: the file is a JSON object holding a list under {lists[0]!r}; "
                                       f"{_EXPECTED_LAYOUT} (e.g. extract it with `jq '.{lists[0]}'`)")
        yield rec


def _json_lines(reader: _HashingReader, head: bytes) -> Iterator[InputRecord]:
    pending, index, line_no = head, 0, 0
    while True:
        chunk = reader.read()
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop() if chunk else b""
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            yield _parse_line(index, line_no, line)
            index += 1
        if not chunk:
            return


def _parse_line(index: int, line_no: int, line: bytes) -> InputRecord:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return InputRecord(index, error=Rejection(Reason.INVALID_UTF8, f"line {line_no}: {e}"))
    try:
        return InputRecord(index, value=json.loads(text))
    except json.JSONDecodeError as e:
        return InputRecord(index, error=Rejection(Reason.INVALID_JSON, f"line {line_no}: {e}"))


class _TextWindow:
    """Decoded text of a byte stream, read on demand; ``pos`` is the parse position."""

    def __init__(self, reader: _HashingReader, head: bytes, url: str):
        self.reader, self.url = reader, url
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.eof = "", 0, False
        self.consumed = 0  # characters dropped from the front of ``text``
        self._feed(head)

    def _feed(self, chunk: bytes) -> None:
        try:
            new = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise InputFormatError(f"{self.url}: JSON list is not valid UTF-8: {e}") from None
        self.eof = not chunk
        self.consumed += self.pos
        self.text = self.text[self.pos:] + new
        self.pos = 0

    def more(self) -> bool:
        """Read the next chunk; False at end of file."""
        if self.eof:
            return False
        self._feed(self.reader.read())
        return True

    def skip_blanks(self) -> str:
        """Advance past whitespace; the next character, or '' at end of file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]

    def error(self, what: str) -> InputFormatError:
        return InputFormatError(f"{self.url}: not a valid JSON list at character {self.consumed + self.pos}: {what}")


def _json_list(reader: _HashingReader, head: bytes, url: str) -> Iterator[InputRecord]:
    window = _TextWindow(reader, head, url)
    decoder = json.JSONDecoder()
    window.skip_blanks()
    window.pos += 1  # the '['
    if window.skip_blanks() == "]":
        window.pos += 1
    else:
        index = 0
        while True:
            if window.skip_blanks() == "":
                raise window.error("unexpected end of file")
            while True:
                try:
                    value, end = decoder.raw_decode(window.text, window.pos)
                    # A value touching the end of the window (a number) might continue.
                    if end < len(window.text) or window.eof:
                        break
                except json.JSONDecodeError as e:
                    if window.eof:
                        raise window.error(e.msg) from None
                window.more()
            window.pos = end
            yield InputRecord(index, value=value)
            index += 1
            sep = window.skip_blanks()
            window.pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise window.error(f"expected ',' or ']' after element {index - 1}, got {sep!r}")
    if window.skip_blanks() != "":
        raise window.error("data after the closing ']'")
