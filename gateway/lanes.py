"""Lanes: many metered calls to one backend replica on one stream (the gateway's side).

A :class:`LanePool` per backend channel keeps a few lanes open
(``/dreamsight.internal.v1.Lanes/Carry``, see :mod:`dreamsight_server.lanes`)
and puts each new call on the open lane with the fewest calls, opening
another once each has ``calls_per_lane``: the channel's round-robin balancer
picks a replica per lane, so calls still spread over replicas, and a lane
takes no new calls after ``max_age_s`` (as connections are aged, so that new
replicas get work) or once its replica says it is shutting down. A lane with
no calls left and no new ones to take is closed.

:class:`LaneCall` is one call on a lane with the surface of the settled
twin's grpc call that :class:`gateway.calls.MeteredCall` uses (``write``,
``read``, ``done_writing``, ``initial_metadata``, ``trailing_metadata``,
``cancel``), so the one lifecycle of a metered call (admit, stream, settle,
bill) is the same on both transports. A lane that fails (its replica died, the
channel closed) ends each of its calls with the lane's error and no report, so
each is billed an estimate from the device share it announced.

A lane's writer sends what queued while its last write was out (calls
opened by a burst of clients, stops, flow-control reports) as one message,
the first request with the rest in its ``batch``, to a replica that reads
batches (lanes version 2 in its ``x-dreamsight-lanes`` header); a replica of
version 1 gets one request per message, as before.

Each call has its own flow-control window (:data:`WINDOW_BYTES`): the replica
sends at most that many bytes of a call's messages ahead of what its caller
has read, so a caller that stalls holds back its own call, never the lane
nor the other calls on it.

A call whose request is larger than :data:`LANE_REQUEST_BYTES` (images)
goes on its own settled stream instead: on a lane it would hold the lane's
writer back from the other calls, and one over the replica's receive limit
would end the lane with every call on it. Each lane carries the gateway's
token (the pool's ``metadata``): a replica takes lanes from nobody else.

A replica that does not serve lanes (an older vision service, during a
rolling upgrade) answers a lane with UNIMPLEMENTED before any reply: its calls
then go, unseen by their callers, on their own settled streams (the
``settled`` factory each call brings), and so do the pool's new calls for
:data:`NO_LANES_S`, after which lanes are tried again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from dreamsight.internal.v1 import lanes_pb2

from dreamsight_server.lanes import LANE_PATH
from dreamsight_server.metadata import DEVICE_SHARE_HEADER, GPU_SECONDS_TRAILER, LANES_HEADER

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
_CODES = {code.value[0]: code for code in grpc.StatusCode}
WINDOW_BYTES = 1024 * 1024
"""Bytes of a call's messages a replica may send ahead of its caller's reads
(a slow caller holds back its own call, never the lane)."""
LANE_REQUEST_BYTES = 1024 * 1024
"""A call whose serialized request is larger goes on its own settled stream,
not on a lane (see LaneCall.write)."""
NO_LANES_S = 60.0
"""How long a pool whose replica answered a lane with UNIMPLEMENTED sends new
calls on their own settled streams before trying lanes again."""
_LATE_S = 5.0
"""Past a call's timeout, how long the gateway waits for the replica's own
DEADLINE_EXCEEDED end (with what the call spent) before ending it itself."""


log = logging.getLogger(__name__)

Settled = Callable[[float | None], Any]
"""Opens the call on its own settled stream, with this timeout (seconds)."""


def _version(value: str | bytes) -> int:
    """The lanes version a replica announced (1 where it says nothing we read)."""
    try:
        return int(value)
    except ValueError:
        return 1


def _next_message(outbox: collections.deque[lanes_pb2.LaneRequest]) -> lanes_pb2.LaneRequest:
    """The next request, with those queued behind it (up to LANE_REQUEST_BYTES of
    opened requests in all) in its batch: calls opened together go in one
    write, and the replica reads them in one message (lanes version 2)."""
    first = outbox.popleft()
    size = len(first.open.request)
    while outbox:
        size += len(outbox[0].open.request)
        if size > LANE_REQUEST_BYTES:
            break
        first.batch.append(outbox.popleft())
    return first


def _metadata(pairs: Iterable[tuple[str, Any]]) -> grpc.aio.Metadata:
    return grpc.aio.Metadata(*pairs)


class LaneCall:
    """One metered call on a lane (see the module doc)."""

    def __init__(
        self,
        lane: _Lane,
        number: int,
        method: str,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
        settled: Settled | None,
    ) -> None:
        self._lane = lane
        self._number = number
        self._method = method
        self._metadata = metadata
        self._timeout = timeout
        self._serializer = serializer
        self._deserializer = deserializer
        self._inbox: collections.deque[Any] = collections.deque()
        """Serialized messages, then _EOF or the AioRpcError that ended the call."""
        self._waiting: asyncio.Future[None] | None = None
        self._opened = False
        self._ended = False
        self._share: float | None = None
        self._trailers = _metadata(())
        self._timer: asyncio.TimerHandle | None = None
        self._taken = 0
        """Bytes read since the last consumed_bytes report."""
        self._created = time.monotonic()
        self._request: Any = None
        self._stopped = False
        self._settled = settled
        self._fallback: Any = None
        """The call on its own settled stream, once its replica had no lanes."""
        self._fallback_write: asyncio.Task[None] | None = None

    async def write(self, request: Any) -> None:
        """Open the call with its one request."""
        if self._fallback is not None:
            await self._fallback.write(request)
            return
        if self._opened or self._ended:
            return
        payload = request if self._serializer is None else self._serializer(request)
        if len(payload) > LANE_REQUEST_BYTES and self._settled is not None:
            # Its own stream: a big request (images) would hold the lane's writer
            # back from every other call, and one over the replica's receive
            # limit would end the whole lane, every tenant's call on it.
            self._lane.forget(self._number)
            self._fallback = self._settled(self._timeout)
            await self._fallback.write(request)
            return
        self._opened = True
        self._request = request
        open_ = lanes_pb2.LaneOpen(
            method=self._method,
            request=payload,
            metadata=[lanes_pb2.LaneHeader(key=k, value=v) for k, v in self._metadata],
            window_bytes=WINDOW_BYTES,
        )
        if self._timeout is not None:
            open_.timeout_seconds = self._timeout
            self._timer = asyncio.get_running_loop().call_later(
                self._timeout + _LATE_S, self._expire
            )
        self._lane.send(lanes_pb2.LaneRequest(call=self._number, open=open_))

    async def read(self) -> Any:
        """The next message, or _EOF at a normal end; raises the call's AioRpcError."""
        inbox = self._inbox
        while not inbox:
            if self._fallback is not None:
                return await self._read_fallback()
            self._waiting = asyncio.get_running_loop().create_future()
            try:
                await self._waiting
            finally:
                self._waiting = None
        item = inbox[0]
        if item is _EOF:
            return item
        if isinstance(item, BaseException):
            raise item
        inbox.popleft()
        self._taken += len(item)
        if self._taken >= WINDOW_BYTES // 2:
            self._lane.send(lanes_pb2.LaneRequest(call=self._number, consumed_bytes=self._taken))
            self._taken = 0
        return item if self._deserializer is None else self._deserializer(item)

    async def _read_fallback(self) -> Any:
        if self._fallback_write is not None:
            with contextlib.suppress(Exception):  # a failed call shows in its read
                await self._fallback_write
            self._fallback_write = None
        return await self._fallback.read()

    async def done_writing(self) -> None:
        """Stop now: the replica stops the work and ends the call with what it spent."""
        if self._fallback is not None:
            await self._fallback.done_writing()
            return
        if self._ended:
            return
        self._stopped = True
        if not self._opened:  # stopped before it began: nothing spent
            self._finish(_EOF, ((GPU_SECONDS_TRAILER, repr(0.0)),))
            return
        self._lane.send(lanes_pb2.LaneRequest(call=self._number, stop=True))

    async def initial_metadata(self) -> grpc.aio.Metadata:
        """The device share the replica announced when it started the call."""
        if self._fallback is not None:
            initial: grpc.aio.Metadata = await self._fallback.initial_metadata()
            return initial
        if self._share is None:
            return _metadata(())
        return _metadata(((DEVICE_SHARE_HEADER, repr(self._share)),))

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        """The call's trailers (its GPU-seconds), once it has ended."""
        if self._fallback is not None:
            trailing: grpc.aio.Metadata = await self._fallback.trailing_metadata()
            return trailing
        return self._trailers

    def cancel(self) -> bool:
        """Give up on the call: stop it upstream and end it here without a report."""
        if self._fallback is not None:
            return bool(self._fallback.cancel())
        if self._ended:
            return False
        if self._opened:
            self._lane.send(lanes_pb2.LaneRequest(call=self._number, stop=True))
        self._fail(grpc.StatusCode.CANCELLED, "cancelled by the gateway")
        return True

    def _wake(self) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _expire(self) -> None:
        if not self._ended:
            self._lane.send(lanes_pb2.LaneRequest(call=self._number, stop=True))
            self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _finish(self, end: Any, trailers: Iterable[tuple[str, Any]]) -> None:
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        self._trailers = _metadata(trailers)
        if end is not _EOF:
            end = grpc.aio.AioRpcError(end[0], _metadata(()), self._trailers, end[1], None)
        self._inbox.append(end)
        self._lane.forget(self._number)
        self._wake()

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """End without a report (the lane failed, or the gateway gave up)."""
        self._finish((code, details), ())

    def _fall_back(self, code: grpc.StatusCode, details: str) -> None:
        """The replica has no lanes and never began this call: go on a settled
        stream of its own (a call already stopped ends, having spent nothing)."""
        if self._ended:
            return
        if self._stopped:
            self._finish(_EOF, ((GPU_SECONDS_TRAILER, repr(0.0)),))
            return
        if self._settled is None:
            self._fail(code, details)
            return
        if self._timer is not None:
            self._timer.cancel()
        timeout = self._timeout
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - self._created))
        self._fallback = self._settled(timeout)
        if self._opened:
            self._fallback_write = asyncio.get_running_loop().create_task(
                self._fallback.write(self._request)
            )
        self._lane.forget(self._number)
        self._wake()

    def deliver(self, item: lanes_pb2.LaneItem) -> None:
        """One event of this call from its lane."""
        which = item.WhichOneof("event")
        if which == "message":
            if not self._ended:
                self._inbox.append(item.message)
                self._wake()
        elif which == "device_share":
            self._share = item.device_share
        elif which == "end":
            end = item.end
            trailers = [
                (t.key, t.value if t.key.endswith("-bin") else t.value.decode(errors="replace"))
                for t in end.trailers
            ]
            trailers.append((GPU_SECONDS_TRAILER, repr(end.gpu_seconds)))
            code = _CODES.get(end.code, grpc.StatusCode.UNKNOWN)
            self._finish(_EOF if code is grpc.StatusCode.OK else (code, end.details), trailers)


class _Lane:
    """One lane to one replica: its calls, a writer of opens and stops, a reader."""

    def __init__(self, pool: LanePool, stream: Any) -> None:
        self._pool = pool
        self._stream = stream
        self.calls: dict[int, LaneCall] = {}
        self._numbers = 0
        self.opened = time.monotonic()
        self.retired = False
        self._outbox: collections.deque[lanes_pb2.LaneRequest] = collections.deque()
        self._wake = asyncio.Event()
        self._closing = False
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_all())
        self._reader = loop.create_task(self._read_all())

    def accepts(self, now: float) -> bool:
        """Whether new calls may go on this lane."""
        if self.retired or self._closing:
            return False
        if now - self.opened > self._pool.max_age_s:
            self.retired = True
            self._close_if_idle()
            return False
        return True

    def open_call(
        self,
        method: str,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
        settled: Settled | None,
    ) -> LaneCall:
        """A new call on this lane (sent by its first write)."""
        self._numbers += 1
        call = LaneCall(
            self, self._numbers, method, metadata, timeout, serializer, deserializer, settled
        )
        self.calls[self._numbers] = call
        return call

    def send(self, request: lanes_pb2.LaneRequest) -> None:
        """Queue a message for the replica."""
        if self._closing:
            return
        self._outbox.append(request)
        self._wake.set()

    def forget(self, number: int) -> None:
        """A call has ended: nothing more of it is expected."""
        self.calls.pop(number, None)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.retired and not self.calls and not self._closing:
            self._closing = True
            self._pool.drop(self)
            self._wake.set()

    async def _write_all(self) -> None:
        stream, outbox, wake = self._stream, self._outbox, self._wake
        with contextlib.suppress(Exception):
            # Nothing is written before the replica says it serves lanes: one
            # without them ends the stream at once, and a write racing that end
            # can turn its UNIMPLEMENTED into gRPC's own INTERNAL, hiding it.
            served = await stream.initial_metadata()
            versions = [value for key, value in served or () if key == LANES_HEADER]
            if not versions:
                return  # the reader hears how the lane ended
            batches = _version(versions[0]) >= 2
            while True:
                await wake.wait()
                wake.clear()
                while outbox:
                    await stream.write(_next_message(outbox) if batches else outbox.popleft())
                if self._closing:
                    await stream.done_writing()
                    return

    async def _read_all(self) -> None:
        calls = self.calls
        code, details = grpc.StatusCode.UNAVAILABLE, "the lane to the backend ended"
        replied = False
        try:
            while True:
                reply = await self._stream.read()
                if reply is _EOF:
                    break
                replied = True
                for item in reply.items:
                    call = calls.get(item.call)
                    if call is not None:
                        call.deliver(item)
                if reply.retiring:
                    self.retired = True
                    self._close_if_idle()
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or details
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the gateway is stopping"
            raise
        finally:
            self._closing = True
            self._pool.drop(self)
            self._wake.set()
            unserved = code is grpc.StatusCode.UNIMPLEMENTED and not replied
            if unserved:
                self._pool.no_lanes(details)
            for call in list(calls.values()):
                if unserved:
                    call._fall_back(code, details)
                else:
                    call._fail(code, details)

    def close(self) -> None:
        """Stop the lane now (the gateway is stopping)."""
        self._stream.cancel()


class LanePool:
    """The lanes of one backend channel (see the module doc)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        calls_per_lane: int,
        methods: Iterable[str],
        metadata: Sequence[tuple[str, str]] = (),
        max_age_s: float = 30.0,
    ) -> None:
        """``metadata`` goes on each lane's stream (the gateway's token: a
        replica takes lanes only from the gateway)."""
        untyped: Any = channel  # grpc-stubs lack _registered_method
        self._carry = untyped.stream_stream(
            LANE_PATH,
            lanes_pb2.LaneRequest.SerializeToString,
            lanes_pb2.LaneReply.FromString,
            _registered_method=True,
        )
        self.calls_per_lane = calls_per_lane
        self.methods = frozenset(methods)
        self.max_age_s = max_age_s
        self._metadata = tuple(metadata)
        self._lanes: list[_Lane] = []
        self._no_lanes_until = 0.0

    @property
    def lanes(self) -> int:
        """Lanes open now."""
        return len(self._lanes)

    def call(
        self,
        method: str,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        serializer: Callable[[Any], bytes] | None = None,
        deserializer: Callable[[bytes], Any] | None = None,
        settled: Settled | None = None,
    ) -> Any:
        """A new call on the open lane with the fewest calls, or on a new lane;
        on its own settled stream while the replica serves no lanes."""
        now = time.monotonic()
        if settled is not None and now < self._no_lanes_until:
            return settled(timeout)
        best: _Lane | None = None
        for lane in list(self._lanes):
            room = lane.accepts(now) and len(lane.calls) < self.calls_per_lane
            if room and (best is None or len(lane.calls) < len(best.calls)):
                best = lane
        if best is None:
            best = _Lane(self, self._carry(metadata=self._metadata))
            self._lanes.append(best)
        return best.open_call(method, metadata, timeout, serializer, deserializer, settled)

    def no_lanes(self, details: str) -> None:
        """The replica answered a lane with UNIMPLEMENTED: settled streams for a while."""
        if time.monotonic() >= self._no_lanes_until:
            log.warning(
                "a backend serves no lanes (%s; an older vision service?): calls go on "
                "their own streams for %.0f s",
                details,
                NO_LANES_S,
            )
        self._no_lanes_until = time.monotonic() + NO_LANES_S

    def drop(self, lane: _Lane) -> None:
        """A lane takes no more calls."""
        with contextlib.suppress(ValueError):
            self._lanes.remove(lane)

    def close(self) -> None:
        """Stop every lane (the gateway is stopping)."""
        for lane in list(self._lanes):
            lane.close()


_POOLS: weakref.WeakKeyDictionary[grpc.aio.Channel, LanePool] = weakref.WeakKeyDictionary()


def attach(channel: grpc.aio.Channel, pool: LanePool) -> None:
    """Carry the pool's methods over lanes on this channel."""
    _POOLS[channel] = pool


def pool_for(channel: grpc.aio.Channel, method: str) -> LanePool | None:
    """The lanes that carry method ("<Service>.<Method>") on channel, if any."""
    pool = _POOLS.get(channel)
    return pool if pool is not None and method in pool.methods else None
