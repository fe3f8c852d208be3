"""Read a JSON file whose top level is a list, a few megabytes at a time, with a C JSON decoder.

Why: ``json.load`` of an LVIS results file (5.9M detections, ~0.5 GB) holds every element as a Python
object at once (3.6 GB and 36 s here). ``JsonListReader`` instead cuts the file at commas between
top-level elements and decodes one piece at a time (with ``json.loads`` or a faster typed decoder), so a
caller that turns each piece into arrays keeps only one piece's objects alive. The file must still be
valid JSON as a whole; any error names the file, the line, the column and the byte offset.

How a cut is found: outside strings and at nesting depth 0 (relative to the list), a comma separates two
elements. The fast path tries the last ``}`` followed by a comma in the buffer and lets the decoder
judge the piece: a cut inside a string or a nested value always leaves the piece invalid (an unterminated
string or an unclosed bracket), so a piece that decodes was cut at a true separator. Only when that fails
is the buffer scanned exactly (quotes, escapes, brackets, in numpy).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_WHITESPACE = b" \t\r\n"
_STRUCTURAL = np.zeros(256, dtype=np.int8)  # +1 opening bracket, -1 closing bracket, 2 comma, 0 other
_STRUCTURAL[[ord("{"), ord("[")]] = 1
_STRUCTURAL[[ord("}"), ord("]")]] = -1
_STRUCTURAL[ord(",")] = 2


def _unescaped_quotes(a: np.ndarray) -> np.ndarray:
    """Positions of the ``"`` bytes of ``a`` (uint8) that open or close a string (not preceded by an odd
    run of backslashes)."""
    quotes = np.flatnonzero(a == ord('"'))
    if quotes.size == 0 or not (a == ord("\\")).any():
        return quotes
    keep = np.ones(quotes.size, dtype=bool)
    for k in np.flatnonzero(a[np.maximum(quotes - 1, 0)] == ord("\\")):  # rare: only quotes after a backslash
        pos, run = int(quotes[k]) - 1, 0
        while pos >= 0 and a[pos] == ord("\\"):
            run, pos = run + 1, pos - 1
        keep[k] = run % 2 == 0
    return quotes[keep]


def scan_list_buffer(buf: bytes) -> tuple[int, int]:
    """Exact scan of ``buf``, which starts inside a JSON list at depth 0 outside any string.

    Returns ``(last_comma, end)``: the offset of the last top-level comma before the list ends (-1 if
    none) and the offset of the list's closing ``]`` (-1 if it does not close in ``buf``).
    """
    a = np.frombuffer(buf, dtype=np.uint8)
    quotes = _unescaped_quotes(a)
    kind = _STRUCTURAL[a]
    pos = np.flatnonzero(kind)
    pos = pos[np.searchsorted(quotes, pos) % 2 == 0]  # outside strings: an even number of quotes before
    kind = kind[pos]
    depth = np.cumsum(np.where(kind == 2, 0, kind))  # depth after each structural byte
    closing = np.flatnonzero(depth < 0)
    end = int(pos[closing[0]]) if closing.size else -1
    commas = pos[(kind == 2) & (depth == 0)]
    if end >= 0:
        commas = commas[commas < end]
    return (int(commas[-1]) if commas.size else -1), end


def _fast_cut(buf: bytes) -> int:
    """Offset of the comma after the last ``}`` of ``buf`` (only whitespace between), else -1."""
    close = buf.rfind(b"}")
    while close >= 0:
        rest = buf[close + 1:close + 65].lstrip(_WHITESPACE)
        if rest[:1] == b",":
            return buf.index(b",", close + 1)
        close = buf.rfind(b"}", 0, close)
        if len(buf) - close > 1 << 20:  # no separator near the end: let the exact scan decide
            return -1
    return -1


@contextmanager
def mapped_file(path: str | os.PathLike, what: str = "file") -> Iterator[memoryview | bytes]:
    """The bytes of ``path`` mapped read-only, for a decoder that needs the whole file (msgspec).

    Mapped pages are the page cache's (clean, dropped under memory pressure), not the process's own memory
    as ``read_bytes`` would make them. Errors name the file (``what``). Values decoded as
    ``msgspec.Raw`` point into the mapping: drop them before the block ends.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        f = open(path, "rb")
    except OSError as err:
        raise OSError(f"{what} {path} cannot be read: {err}") from err
    with f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files
            yield b""
            return
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapping)
        try:
            yield view
        finally:
            try:
                view.release()
                mapping.close()
            except BufferError:  # something still points into it: closed when collected
                pass


def _as_list(buf: bytes, end: int | None = None) -> bytes:
    """``b"[" + buf[:end] + b"]"`` with a single copy of the (large) buffer."""
    return b"".join((b"[", memoryview(buf)[:end], b"]"))


class JsonListReader:
    """Iterate the elements of a top-level JSON list in file order, piece by piece.

    ``for offset, items in JsonListReader(path, what)``: ``items`` is a Python list of decoded elements,
    ``offset`` the index of ``items[0]`` in the whole list. ``block_bytes`` bounds the bytes decoded per
    piece (a single element larger than that makes a larger piece). ``on_bytes(n)`` is called with the
    number of bytes read after each block (progress bars). ``decode(text) -> list`` turns the bytes of
    a JSON list into its elements (default ``json.loads``); it must raise ``json.JSONDecodeError`` on
    invalid JSON (a faster typed decoder falls back to ``json.loads`` for that), which this reader
    turns into an error naming the file, line and column.
    """

    def __init__(self, path: str | os.PathLike, what: str = "JSON file", block_bytes: int = 1 << 24,
                 on_bytes: Callable[[int], None] | None = None, decode: Callable[[bytes], list] = json.loads) -> None:
        self.path, self.what, self.block_bytes, self.on_bytes = Path(path), what, int(block_bytes), on_bytes
        self.decode = decode
        if not self.path.is_file():
            raise FileNotFoundError(f"{what} not found: {self.path}")

    def _error(self, msg: str, file_offset: int) -> ValueError:
        line, line_start, done = 1, 0, 0
        with open(self.path, "rb") as f:  # count lines block by block: the file may be large
            while done < file_offset:
                block = f.read(min(self.block_bytes, file_offset - done))
                if not block:
                    break
                line += block.count(b"\n")
                if b"\n" in block:
                    line_start = done + block.rfind(b"\n") + 1
                done += len(block)
        column = file_offset - line_start + 1
        return ValueError(f"{self.what} {self.path} is not valid JSON: {msg}: line {line} column {column} (byte {file_offset})")

    def _decode(self, piece: bytes, file_offset: int) -> list:
        if not piece.strip(_WHITESPACE):
            raise self._error("Expecting value", file_offset + len(piece))
        try:
            return self.decode(_as_list(piece))
        except json.JSONDecodeError as err:
            raise self._error(err.msg, file_offset + max(err.pos - 1, 0)) from None
        except UnicodeDecodeError as err:
            raise self._error(f"not UTF-8 ({err.reason})", file_offset + err.start) from None

    def _opening(self, buf: bytes, eof: bool) -> int | None:
        """How many bytes of ``buf`` (the file's start) come up to and including the list's ``[`` (after
        whitespace and a byte-order mark); None while only whitespace has been read and more is coming."""
        stripped = buf.lstrip(_WHITESPACE)
        if not stripped and not eof:
            return None
        if stripped.startswith(b"\xef\xbb\xbf"):
            stripped = stripped[3:].lstrip(_WHITESPACE)
        if stripped[:1] != b"[":
            found = "an empty file" if not stripped else f"{stripped[:1].decode('latin-1')!r} at the top level"
            raise ValueError(f"{self.what} {self.path}: expected a JSON list, found {found}")
        return len(buf) - len(stripped) + 1

    def _unclosed(self, buf: bytes, buf_offset: int) -> ValueError:
        """The error for a file that ends inside its list: the decoder names the first error (an unclosed list
        at the latest)."""
        try:
            json.loads(b"[" + buf)
        except json.JSONDecodeError as err:
            return self._error(err.msg, buf_offset + max(err.pos - 1, 0))
        except UnicodeDecodeError as err:
            return self._error(f"not UTF-8 ({err.reason})", buf_offset + err.start)
        return self._error("the file ends before its top-level list is closed", buf_offset + len(buf))

    def __iter__(self) -> Iterator[tuple[int, list]]:
        index = 0
        try:
            f = open(self.path, "rb")
        except OSError as err:
            raise OSError(f"{self.what} {self.path} cannot be read: {err}") from err
        with f:
            buf, buf_offset, started, eof = b"", 0, False, False
            while True:
                if not eof:
                    block = f.read(self.block_bytes)
                    eof = not block
                    buf += block
                    if self.on_bytes is not None and block:
                        self.on_bytes(len(block))
                if not started:
                    skip = self._opening(buf, eof)
                    if skip is None:
                        continue
                    buf, buf_offset, started = buf[skip:], buf_offset + skip, True
                    if not buf.strip(_WHITESPACE) and not eof:
                        continue
                if not eof:
                    cut = _fast_cut(buf)
                    if cut > 0:
                        try:
                            items = self.decode(_as_list(buf, cut))
                        except (json.JSONDecodeError, UnicodeDecodeError):
                            items = None  # a cut inside a string or nested value, or a real error: scan exactly
                        if items is not None:
                            yield index, items
                            index += len(items)
                            buf, buf_offset = buf[cut + 1:], buf_offset + cut + 1
                            continue
                comma, end = scan_list_buffer(buf)
                if end >= 0:
                    tail = buf[end + 1:] + (b"" if eof else f.read())
                    if tail.strip(_WHITESPACE):
                        extra = len(tail) - len(tail.lstrip(_WHITESPACE))
                        raise self._error("extra data after the list", buf_offset + end + 1 + extra)
                    piece = buf[:end]
                    if index > 0 or piece.strip(_WHITESPACE):  # only "[]" may hold nothing before its ']'
                        yield index, self._decode(piece, buf_offset)
                    return
                if eof:
                    raise self._unclosed(buf, buf_offset)
                if comma >= 0:
                    items = self._decode(buf[:comma], buf_offset)
                    yield index, items
                    index += len(items)
                    buf, buf_offset = buf[comma + 1:], buf_offset + comma + 1
