"""Zero-copy RESP I/O on a redis-py connection: commands packed as a list of buffers (values sent from their own
memory) and replies read from the socket straight into caller buffers.

This is the one module that reaches into redis-py's private parts (a connection's ``_sock``);
``tests/test_redis_adapter.py`` pins it, so a redis-py change that breaks it fails a test instead of a load.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvtier.l2.adapters.base import MISS, Buffer, Prepare, scatter

T = TypeVar("T")

# Values above this many bytes go to the socket as their own buffer; smaller pieces are coalesced into one send.
INLINE_LIMIT = 16 * 1024


class Packer:
    """RESP commands as a list of buffers: small pieces coalesced, large values referenced, never copied."""

    def __init__(self) -> None:
        self.buffers: list[Buffer] = []
        self._small = bytearray()

    def command(self, args: Sequence[bytes | Sequence[memoryview]]) -> None:
        self._small += b"*%d\r\n" % len(args)
        for arg in args:
            parts: Sequence[Buffer] = [arg] if isinstance(arg, bytes) else arg
            self._small += b"$%d\r\n" % sum(memoryview(p).nbytes for p in parts)
            for part in parts:
                if memoryview(part).nbytes > INLINE_LIMIT:
                    self.buffers.append(bytes(self._small))
                    self._small.clear()
                    self.buffers.append(part)
                else:
                    self._small += part
            self._small += b"\r\n"

    def finish(self) -> list[Buffer]:
        """The buffers to send, in order."""
        if self._small:
            self.buffers.append(bytes(self._small))
            self._small.clear()
        return self.buffers


class RespReader:
    """Reads RESP replies from a redis-py connection's socket, bulk strings straight into caller buffers.

    redis-py returns every bulk reply as a fresh ``bytes`` built through several intermediate copies; a 32 MiB
    chunk would be copied three times before reaching its tensor. The pool hands out a connection only after
    checking that nothing is pending on it, the reader consumes exactly the replies of the commands just sent,
    and the caller drops the connection on any error, so redis-py's own parser never sees a half-read stream.
    """

    _READ_AHEAD = 64 * 1024

    def __init__(self, conn: Any) -> None:
        from redis import exceptions as rx

        self._rx = rx
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise rx.ConnectionError("connection closed before the replies were read")
        self._sock: socket.socket = sock
        self._buf = bytearray()
        self._pos = 0

    def _recv_more(self) -> None:
        chunk = self._recv(lambda: self._sock.recv(self._READ_AHEAD))
        del self._buf[: self._pos]
        self._pos = 0
        self._buf += chunk

    def _recv(self, fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except TimeoutError as exc:  # socket.timeout
            raise self._rx.TimeoutError("Timeout reading from socket") from exc
        except OSError as exc:
            raise self._rx.ConnectionError(f"Error while reading from socket: {exc}") from exc
        if not result:
            raise self._rx.ConnectionError("Connection closed by server.")
        return result

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos : end])
                self._pos = end + 2
                if line[:1] == b"-":
                    message = line[1:].decode(errors="replace")
                    if message.startswith("OOM"):
                        raise self._rx.OutOfMemoryError(message)
                    raise self._rx.ResponseError(message)
                return line
            self._recv_more()

    def _fill(self, view: memoryview) -> None:
        """Fill ``view`` exactly: first from the read-ahead, then straight from the socket."""
        have = min(len(self._buf) - self._pos, len(view))
        if have:
            view[:have] = self._buf[self._pos : self._pos + have]
            self._pos += have
        while have < len(view):
            have += self._recv(lambda: self._sock.recv_into(view[have:]))  # noqa: B023 - called at once

    def bulk_with(self, index: int, head_size: int, prepare: Prepare) -> int:
        """Read one bulk reply header first: its first ``head_size`` bytes go to ``prepare(index, head, n)``,
        which says where the whole value goes (``None``: skip it); returns its length, or MISS for nil."""
        try:
            line = self._line()
        except self._rx.ResponseError as exc:
            if is_wrong_type(exc):
                return 0  # not a string: unusable, so the tier counts a damaged record and removes it
            raise
        if line == b"_":  # RESP3 null
            return MISS
        if line[:1] == b"!":  # RESP3 blob error
            message = self._blob(int(line[1:])).decode(errors="replace")
            raise (self._rx.OutOfMemoryError if message.startswith("OOM") else self._rx.ResponseError)(message)
        if line[:1] != b"$":
            raise self._rx.InvalidResponse(f"expected a bulk string, got {line[:40]!r}")
        n = int(line[1:])
        if n < 0:
            return MISS
        head = bytearray(min(n, head_size))
        self._fill(memoryview(head))
        bufs = prepare(index, memoryview(head), n)
        left = n - len(head)
        if bufs is not None:
            scatter(head, bufs)
            skip = len(head)
            for buf in bufs:
                view = memoryview(buf).cast("B")
                if skip >= len(view):
                    skip -= len(view)
                    continue
                take = min(len(view) - skip, left)
                self._fill(view[skip : skip + take])
                skip = 0
                left -= take
        self._skip(left)
        self._fill(memoryview(bytearray(2)))  # the CRLF after the value
        return n

    def _skip(self, left: int) -> None:
        scratch = memoryview(bytearray(min(left, self._READ_AHEAD)))
        while left:
            take = min(left, len(scratch))
            self._fill(scratch[:take])
            left -= take

    def _blob(self, n: int) -> bytes:
        data = bytearray(n + 2)
        self._fill(memoryview(data))
        return bytes(data[:n])

    def integer(self) -> int:
        line = self._line()
        if line[:1] != b":":
            raise self._rx.InvalidResponse(f"expected an integer, got {line[:40]!r}")
        return int(line[1:])


def is_wrong_type(exc: BaseException) -> bool:
    """A reply saying the key holds another type than a string (someone else's data under our prefix)."""
    return str(exc).startswith("WRONGTYPE")
