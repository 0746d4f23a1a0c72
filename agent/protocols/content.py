"""Body decoding shared by the HTTP/1 and HTTP/2 decoders: Content-Encoding and gRPC framing.

Everything here is bounded: decompression stops at a byte limit (a small gzip member can inflate
to gigabytes), and a body cut short by sampling is decoded only as far as its bytes go, never
padded or guessed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# wbits for zlib.decompressobj: 16 + MAX_WBITS reads a gzip member, MAX_WBITS a zlib stream,
# -MAX_WBITS a raw deflate stream (what some servers wrongly send as "deflate").
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS

GRPC_PREFIX_LEN = 5  # 1 byte compressed flag, 4 bytes big-endian length


@dataclass(slots=True)
class Decoded:
    data: bytes
    complete: bool  # False: the input was cut short, or the output hit the limit
    ok: bool = True  # False: the encoding is unknown or the bytes do not decode


def _inflate(data: bytes, wbits: int, limit: int, input_complete: bool) -> Decoded:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        return Decoded(out, complete=False)  # more output than `limit`
    # A complete input must end the compressed stream; a cut one may stop anywhere.
    return Decoded(out, complete=input_complete and inflater.eof)


def decode_content(body: bytes, encoding: str, limit: int, body_complete: bool) -> Decoded:
    """Undo a Content-Encoding (gzip, x-gzip, deflate, identity); at most `limit` bytes out."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return Decoded(body[:limit], complete=body_complete and len(body) <= limit)
    try:
        if coding in ("gzip", "x-gzip"):
            return _inflate(body, _GZIP_WBITS, limit, body_complete)
        if coding == "deflate":
            try:
                return _inflate(body, _ZLIB_WBITS, limit, body_complete)
            except zlib.error:
                return _inflate(body, _RAW_DEFLATE_WBITS, limit, body_complete)
    except zlib.error:
        return Decoded(b"", complete=False, ok=False)
    return Decoded(b"", complete=False, ok=False)  # br, zstd, stacked codings: not decoded


@dataclass(slots=True)
class GrpcMessages:
    messages: list[bytes]
    complete: bool  # every byte of the body belonged to a whole, decodable message
    ok: bool = True  # False: a message was compressed with an encoding we do not decode


def split_grpc_messages(
    body: bytes, grpc_encoding: str, limit: int, body_complete: bool, max_messages: int
) -> GrpcMessages:
    """Split a gRPC body into its length-prefixed messages, decompressing flagged ones.

    Messages are returned whole or not at all: one whose prefix or payload runs past the end of
    the body (cut short) or past `limit` bytes of payload in all is left out, with the rest.
    """
    view = memoryview(body)
    messages: list[bytes] = []
    pos = 0
    budget = limit
    complete = body_complete
    ok = True
    while pos + GRPC_PREFIX_LEN <= len(view):
        if len(messages) >= max_messages:
            complete = False
            break
        flag = view[pos]
        length = int.from_bytes(view[pos + 1 : pos + GRPC_PREFIX_LEN], "big")
        start = pos + GRPC_PREFIX_LEN
        if start + length > len(view):
            complete = False  # the last message was cut short
            break
        payload = bytes(view[start : start + length])
        pos = start + length
        if flag & 1:
            decoded = decode_content(payload, grpc_encoding or "identity", budget, True)
            if not decoded.ok or not grpc_encoding:
                ok = False
                complete = False
                break
            if not decoded.complete:
                complete = False  # over the limit: a message is returned whole or not at all
                break
            payload = decoded.data
        elif length > budget:
            complete = False
            break
        messages.append(payload)
        budget -= len(payload)
    else:
        if pos != len(view):
            complete = False  # a partial prefix at the end
    return GrpcMessages(messages, complete, ok)
