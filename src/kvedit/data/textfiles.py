"""Reading a user's text files: UTF-8 only, a byte-order mark dropped, other encodings refused with the place."""

from __future__ import annotations

from pathlib import Path


class TextFileError(ValueError):
    """A file is not UTF-8 text."""


def read_utf8(path: str | Path) -> str:
    """`path` decoded as UTF-8; a byte-order mark (as spreadsheet programs write it) is dropped. Bytes that are not
    UTF-8 (a Latin-1 or Windows-1252 file, say) are refused with the line and column, never replaced."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise TextFileError(
            f"{path} line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8; expected a UTF-8 file "
            "(re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
