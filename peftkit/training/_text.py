"""Text that peftkit reads from files it may not have written (recipes, data, a run's own files).

One decoder, so every "not UTF-8" error points at the same thing the same way:
the first bad byte, its offset in the file and its line.
"""

from __future__ import annotations

__all__ = ["NotUtf8Error", "decode_utf8"]


class NotUtf8Error(ValueError):
    """Bytes that are not UTF-8; the message is where: ``byte 0xe9 at offset 19 (line 2)``."""

    def __init__(self, byte: int, offset: int, line: int):
        self.byte, self.offset, self.line = byte, offset, line
        super().__init__(f"byte 0x{byte:02x} at offset {offset} (line {line})")


def decode_utf8(data: bytes, *, offset: int = 0, line: int = 1) -> str:
    """``data`` as text; a leading byte-order mark is dropped.

    :param offset: the offset of ``data``'s first byte in its file, and :param line: its line (when
        ``data`` is one line of a larger file), so the error places the bad byte in the file.
    :raises NotUtf8Error: at the first byte that is not UTF-8.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NotUtf8Error(data[exc.start], offset + exc.start, line + data.count(b"\n", 0, exc.start)) from None
