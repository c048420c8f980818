"""The one module that touches paho: an MQTT 5 client driven by a `Reactor` instead of a thread of its own.

paho's socket callbacks (`on_socket_open/close/register_write/unregister_write`) put the client's socket in the
reactor's selector, and the reactor calls `loop_read`/`loop_write`/`loop_misc`; so thousands of clients share one
thread. Each connection:

- sets TCP_NODELAY (Nagle adds 40-90 ms to every request/response on a quiet link);
- uses a persistent session (`clean_start=False` with a session expiry), so commands sent while the device was
  offline are delivered when it returns;
- reconnects by itself with jittered exponential back-off;
- reads ahead: paho reads each packet with several tiny `recv` calls (a header byte, the length byte by byte, the
  body), so a plain TCP socket is wrapped to read up to 64 KiB at once and hand paho slices (`_ReadAhead`); a
  wake-up then stops at the first read that found the socket empty instead of trying `READS_PER_WAKEUP` times, and
  bytes already buffered (invisible to the selector) are read on the loop's next turn. The buffer is dropped as
  soon as it is consumed, so an idle connection holds none of it.

Nothing paho-typed leaves this module: callers get `(topic, payload)` and plain ints.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent.reactor import Reactor, Timer

__all__ = ["MqttLink", "Will"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 14 * 24 * 3600
READS_PER_WAKEUP = 16
READ_AHEAD = 65536


class _ReadAhead:
    """A TCP socket whose `recv` reads up to `READ_AHEAD` bytes at once and hands paho the bytes it asks for."""

    __slots__ = ("_data", "_pos", "_sock", "drained")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0
        self.drained = False  # the last read from the kernel found nothing

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            try:
                data = self._sock.recv(max(bufsize, READ_AHEAD))
            except BlockingIOError:
                self.drained = True
                raise
            self.drained = False
            if len(data) <= bufsize:
                return data
            self._data, self._pos = data, 0
        end = self._pos + bufsize
        chunk = self._data[self._pos : end]
        if end >= len(self._data):
            self._data, self._pos = b"", 0
        else:
            self._pos = end
        return chunk

    def pending(self) -> int:
        return len(self._data) - self._pos

    def unread(self) -> bool:
        """Bytes buffered here or waiting in the kernel (a peek; nothing is consumed)."""
        return self.pending() > 0 or _peek(self._sock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _peek(sock: Any) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, AttributeError):
        return False


class _Client(paho.Client):
    """paho's client with a read-ahead buffer on plain TCP sockets (see the module docstring)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if type(sock) is socket.socket:  # not SSL, unix or websockets
            return _ReadAhead(sock)
        return sock


# paho 2.x builds its socket in `_create_socket`; where another paho has no such method, plain paho is used.
_FACTORY = _Client if hasattr(paho.Client, "_create_socket") else paho.Client


@functools.cache
def _connect_properties(session_expiry_s: int) -> Properties:
    # One shared, never-modified object: a paho Properties carries ~2 KiB of lookup tables, which at
    # 10,000 simulated devices is 20 MB for the same four bytes of session expiry.
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttLink:
    """One MQTT connection on a shared reactor.

    Callbacks run on the reactor thread: `on_connect(session_present)`, `on_disconnect()`,
    `on_message(topic, payload)`, `on_publish(mid)` (QoS 1 acknowledged).
    """

    __slots__ = ("_attempts", "_client", "_keepalive", "_misc_timer", "_on_connect", "_on_disconnect", "_on_message",
                 "_on_publish", "_reconnect_max_s", "_reconnect_min_s", "_retry_timer", "_session_expiry_s", "_sock",
                 "_wanted", "client_id", "connected", "connects", "host", "port", "reactor")  # fmt: skip

    def __init__(
        self,
        reactor: Reactor,
        *,
        client_id: str,
        host: str,
        port: int,
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_publish: Callable[[int], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive: int = 60,
        session_expiry_s: int = SESSION_EXPIRY_S,
        reconnect_min_s: float = 0.25,
        reconnect_max_s: float = 15.0,
        max_inflight: int = 20,
    ) -> None:
        self.reactor = reactor
        self.client_id = client_id
        self.host = host
        self.port = port
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_publish = on_publish
        self._keepalive = keepalive
        self._session_expiry_s = session_expiry_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._attempts = 0
        self._wanted = False
        self._sock: Any = None  # a socket.socket, or the _ReadAhead wrapping one
        self._misc_timer: Timer | None = None
        self._retry_timer: Timer | None = None
        self.connected = False
        self.connects = 0
        client = _FACTORY(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.max_inflight_messages_set(max_inflight)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        self._client = client

    # -- reactor I/O -------------------------------------------------------------------------------------------
    def handle_read(self) -> None:
        # paho reads about one packet per loop_read call whatever max_packets says; a busy link (a controller
        # taking hundreds of block requests, a device taking a block broadcast) would otherwise get one packet
        # per turn of a loop shared with thousands of sockets.
        for _ in range(READS_PER_WAKEUP):
            if self._sock is None or self._client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if isinstance(self._sock, _ReadAhead) and not self._sock.pending() and self._sock.drained:
                return  # the kernel had nothing more: the selector says when it has
        if isinstance(self._sock, _ReadAhead) and self._sock.pending():
            self.reactor.call_soon(self.handle_read)  # buffered bytes the selector cannot see: next turn

    def handle_write(self) -> None:
        self._client.loop_write()

    def input_pending(self) -> bool:
        """Whether bytes from the broker wait unread (the loop has not got round to this connection yet)."""
        sock = self._sock
        if sock is None:
            return False
        return sock.unread() if isinstance(sock, _ReadAhead) else _peek(sock)

    def _socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.reactor.add_reader(sock, self)

    def _socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self.reactor.remove(sock)
        self._sock = None

    def _register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self.reactor.set_writing(sock, self, writing=True)

    def _unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self.reactor.set_writing(sock, self, writing=False)

    def _misc(self) -> None:
        self._client.loop_misc()
        if self._sock is not None:
            self._misc_timer = self.reactor.call_later(max(1.0, self._keepalive / 4), self._misc)

    # -- connection --------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Start connecting (and keep reconnecting until `disconnect`)."""
        self._wanted = True
        self._attempt()

    def _attempt(self) -> None:
        self._retry_timer = None
        if not self._wanted or self._sock is not None:
            return
        props = _connect_properties(self._session_expiry_s)
        try:
            if self.connects == 0 and self._attempts == 0:
                self._client.connect(
                    self.host, self.port, keepalive=self._keepalive, clean_start=False, properties=props
                )
            else:
                self._client.reconnect()
        except (OSError, ValueError) as exc:
            log.debug("%s: connect to %s:%s failed: %s", self.client_id, self.host, self.port, exc)
            self._schedule_retry()
            return
        self._attempts += 1
        if self._misc_timer is not None:
            self._misc_timer.cancel()
        self._misc_timer = self.reactor.call_later(max(1.0, self._keepalive / 4), self._misc)

    def _schedule_retry(self) -> None:
        self._attempts += 1
        if not self._wanted or self._retry_timer is not None:
            return
        delay = min(self._reconnect_max_s, self._reconnect_min_s * 2 ** min(self._attempts, 10))
        self._retry_timer = self.reactor.call_later(delay * random.uniform(0.5, 1.0), self._attempt)

    def disconnect(self) -> None:
        """Leave cleanly (no last will) and stop reconnecting."""
        self._wanted = False
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        if self._sock is not None:
            self._client.disconnect()
            # flush the DISCONNECT packet now: the reactor may not turn again for this client
            self._client.loop_write()

    def close(self) -> None:
        """Release the socket for good (after `disconnect`, when the loop will not turn again)."""
        self._wanted = False
        if self._misc_timer is not None:
            self._misc_timer.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        sock, self._sock = self._sock, None
        if sock is not None:
            self.reactor.remove(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self.connected = False

    def abandon(self) -> None:
        """Stop reconnecting and break the connection without a DISCONNECT (a power cut: the will is sent)."""
        self._wanted = False
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self.drop()

    def drop(self) -> None:
        """Break the TCP connection as a network fault would (the broker sends the last will)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused the connection: %s", self.client_id, reason)
            self._schedule_retry()
            return
        self.connected = True
        self.connects += 1
        self._attempts = 0
        if self._on_connect is not None:
            self._on_connect(bool(flags.session_present))

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected and self._on_disconnect is not None:
            self._on_disconnect()
        if self._wanted:
            self._schedule_retry()

    # -- messages ----------------------------------------------------------------------------------------------
    def _paho_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._on_message(message.topic, bytes(message.payload))

    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if self._on_publish is not None:
            self._on_publish(mid)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; returns its message id (QoS 1 messages survive a reconnect inside paho)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("%s: publish to %s refused by the client: %s", self.client_id, topic, info.rc)
        return int(info.mid)

    def subscribe(self, filters: Sequence[str], *, qos: int = 1) -> None:
        if filters:
            self._client.subscribe([(f, qos) for f in filters])

    def unsubscribe(self, filters: Sequence[str]) -> None:
        if filters:
            self._client.unsubscribe(list(filters))
