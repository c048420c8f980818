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
  soon as it is consumed, so an idle connection holds none of it;
- speaks TLS when given a client `ssl.SSLContext` (`agent/tls.py`): the handshake runs on the reactor, never
  blocking it (`SSLWantRead/WriteError` set what the selector waits for), and the TLS socket reads ahead too.
  OpenSSL keeps decrypted bytes of a record that the selector cannot see, so `pending()` counts them and a
  wake-up that leaves some goes on at the loop's next turn. A refused handshake (wrong CA, the broker wanting a
  client certificate, a plaintext port) is logged as a warning that says why, and the link retries with back-off.

Nothing paho-typed leaves this module: callers get `(topic, payload)` and plain ints.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent.reactor import Reactor, Timer
from edgefleet.agent.tls import describe_tls_error

__all__ = ["MqttLink", "Will"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 14 * 24 * 3600
READS_PER_WAKEUP = 16
READ_AHEAD = 65536


class _ReadAhead:
    """A TCP (or TLS) socket whose `recv` reads up to `READ_AHEAD` bytes at once and hands paho what it asks for."""

    __slots__ = ("_data", "_pos", "_sock", "drained", "handshaking", "tls")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0
        self.drained = False  # the last read from the kernel found nothing
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.handshaking = self.tls  # until `do_handshake` completes on the reactor

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            try:
                data = self._sock.recv(max(bufsize, READ_AHEAD))
            except (BlockingIOError, ssl.SSLWantReadError):
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
        """Bytes read but not yet handed to paho: ours, and for TLS the decrypted ones OpenSSL still holds."""
        mine = len(self._data) - self._pos
        if self.tls:
            return mine + int(self._sock.pending())  # type: ignore[attr-defined]
        return mine

    def unread(self) -> bool:
        """Bytes buffered here or waiting in the kernel (a peek; nothing is consumed)."""
        return self.pending() > 0 or _peek(self._sock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _peek(sock: Any) -> bool:
    try:
        if isinstance(sock, ssl.SSLSocket):  # the kernel's bytes, under TLS (an SSLSocket refuses recv flags)
            return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, AttributeError):
        return False


class _Client(paho.Client):
    """paho's client with a read-ahead buffer on TCP and TLS sockets, and a TLS handshake left to the reactor.

    paho itself would do the handshake at once, blocking, in `_create_socket`: one slow or silent broker would
    then stall every device on the loop. `tls_error` keeps the last TLS failure paho's reads swallowed.
    """

    tls_error: BaseException | None = None

    def _create_socket(self) -> Any:
        context = self._ssl_context
        if self._ssl and context is not None and self._transport == "tcp":
            raw = self._create_socket_connection()
            try:
                return _ReadAhead(context.wrap_socket(raw, server_hostname=self._host, do_handshake_on_connect=False))
            except BaseException:
                raw.close()
                raise
        sock = super()._create_socket()
        if type(sock) is socket.socket:  # not SSL, unix or websockets
            return _ReadAhead(sock)
        return sock

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except ssl.SSLError as exc:  # not "want read/write": paho turns those into BlockingIOError
            self.tls_error = exc
            raise


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

    __slots__ = ("_answered", "_attempts", "_client", "_keepalive", "_misc_timer", "_on_connect", "_on_disconnect",
                 "_on_message", "_on_publish", "_reconnect_max_s", "_reconnect_min_s", "_retry_timer",
                 "_session_expiry_s", "_sock", "_tls_reported", "_wanted", "_will", "client_id", "connected",
                 "connects", "host", "last_error", "port", "reactor", "tls")  # fmt: skip

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
        will: Will | Callable[[], Will] | None = None,
        keepalive: int = 60,
        session_expiry_s: int = SESSION_EXPIRY_S,
        reconnect_min_s: float = 0.25,
        reconnect_max_s: float = 15.0,
        max_inflight: int = 20,
        tls: ssl.SSLContext | None = None,
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
        self.tls = tls is not None
        self._answered = self._tls_reported = False  # this connection: CONNACK seen / TLS failure reported
        self.last_error: str | None = None  # why the last connection attempt failed, for an operator
        client = _FACTORY(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username is not None:
            client.username_pw_set(username, password)
        # A callable will is asked again before every connection attempt (its payload names that connection).
        self._will = will
        client.max_inflight_messages_set(max_inflight)
        if tls is not None:
            client.tls_set_context(tls)
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
        if isinstance(self._sock, _ReadAhead) and self._sock.handshaking:
            self._handshake(self._sock)
            return
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
        if isinstance(self._sock, _ReadAhead) and self._sock.handshaking:
            self._handshake(self._sock)
            return
        self._client.loop_write()

    def _handshake(self, sock: _ReadAhead) -> None:
        """One step of the TLS handshake; once done, the CONNECT paho queued at the socket's opening goes out."""
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.reactor.set_writing(sock, self, writing=False)  # type: ignore[arg-type]
            return
        except ssl.SSLWantWriteError:
            self.reactor.set_writing(sock, self, writing=True)  # type: ignore[arg-type]
            return
        except (OSError, ValueError, AttributeError) as exc:  # ssl.SSLError and SSLCertVerificationError included;
            # AttributeError: the socket was shut down meanwhile (a dropped link), ssl's object is gone
            self._tls_failed(exc)
            # paho's own path for a lost connection: closes the socket, calls on_disconnect, which retries
            self._client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return
        sock.handshaking = False
        self._client.loop_write()
        if sock.pending():  # decrypted bytes read along with the handshake: the selector will not announce them
            self.reactor.call_soon(self.handle_read)

    def _tls_failed(self, exc: BaseException | str) -> None:
        self._tls_reported = True
        self.last_error = exc if isinstance(exc, str) else describe_tls_error(exc)
        log.warning(
            "%s: TLS connection to %s:%s failed: %s; retrying with back-off",
            self.client_id,
            self.host,
            self.port,
            self.last_error,
        )

    def input_pending(self) -> bool:
        """Whether bytes from the broker wait unread (the loop has not got round to this connection yet)."""
        sock = self._sock
        if sock is None:
            return False
        return sock.unread() if isinstance(sock, _ReadAhead) else _peek(sock)

    def _socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._answered = self._tls_reported = False
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
        will = self._will() if callable(self._will) else self._will
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
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
        self._answered = True
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
        tls_error = getattr(client, "tls_error", None)
        if tls_error is not None:  # the broker broke off under TLS (e.g. it wanted a client certificate)
            client.tls_error = None
            self._tls_failed(tls_error)
        elif self.tls and not self._answered and not self._tls_reported:
            # The handshake passed, then the broker hung up without a CONNACK: under TLS 1.3 that is how a broker
            # requiring a client certificate refuses one (its alert may or may not reach us before the reset).
            self._tls_failed(
                "the broker closed the TLS connection before accepting MQTT "
                "(does it require a client certificate? --tls-cert/--tls-key)"
            )
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
