"""The controller's MQTT connection: the only module that touches paho.

paho-mqtt 2.x with the VERSION2 callback API; MQTT 5 with a persistent session (clean start off, a session
expiry) so QoS 1 messages published while the controller was away are delivered when it returns, falling back
to MQTT 3.1.1 with a persistent session where the broker does not offer 5. Reconnects with exponential
backoff; TCP_NODELAY is set on every socket, since Nagle's algorithm delays small QoS 1 acknowledgements.

Messages reach the handler as `(topic: str, payload: bytes)`; paho objects never leave this module. The
handler runs on paho's network thread: an exception in it is logged and swallowed, so it never stops the loop.

Example::

    client = MqttClient(host="127.0.0.1", port=1883, client_id="edgefleet-controller",
                        on_message=service.handle, subscriptions=controller_filters("default"))
    client.connect(timeout=10)
    client.publish(topic, payload, qos=1, expiry_s=3600)
    mid = client.publish_tracked(topic, payload, qos=1, on_done=window.release)   # no wait; None: untracked
    client.close()

`publish_tracked` is for senders that bound their own unacknowledged output (the block server's in-flight
window): `on_done(mid)` runs on paho's thread (holding no lock of ours) once the broker acknowledged the message
(QoS 1) or it was written to the socket (QoS 0), exactly once per tracked publish while the client lives. A QoS 0
message that paho drops on a reconnect is reported done at the next connect (it will never be written); a QoS 1
message is sent again by paho and reported when acknowledged. Registration happens under paho's own out-message
lock, so an acknowledgement that races the return of `publish` still finds its callback.

With `tls=MqttTls(ca, cert, key)` the connection speaks TLS 1.2 or later, checks the broker's certificate against
the CA file and its name against `host`, and presents the client certificate when given. The read-ahead buffer
wraps the TLS socket as it does a TCP one; its `pending()` counts the decrypted bytes OpenSSL still holds, which
`select()` cannot see. A refused handshake (wrong CA, a plaintext port, a broker wanting a client certificate)
fails `connect()` at once with the reason instead of waiting for its timeout.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.controller.config import MqttTls
from edgefleet.controller.errors import ConfigError, MqttError

__all__ = ["MqttClient"]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
_READ_AHEAD = 65536
_MAX_BATCH = 1000
_PUBACK = 0x40
_UNSUPPORTED_PROTOCOL = 132  # CONNACK reason "Unsupported Protocol Version" (MQTT 5); 1 in MQTT 3.1.1
MAX_MID = 65535  # MQTT packet identifiers are 16-bit: at most this many QoS > 0 messages unacknowledged at once
DoneCallback = Callable[[int], None]


class _BufferedSocket:
    """A TCP (or TLS) socket whose `recv` reads up to 64 KiB at once and hands paho the bytes it asks for.

    paho reads every packet with several tiny `recv` calls (one byte of header, the length byte by byte, then
    the body): four system calls or more per message. Reading ahead cuts that to a fraction of one, which
    roughly doubled the controller's receive rate in benchmarks/telemetry_ingest.py. `pending()` tells paho's
    loop that buffered bytes are waiting, exactly as it already asks SSL sockets, so it does not block in
    `select()` while data sits in the buffer (for TLS, in ours or in OpenSSL's).
    """

    __slots__ = ("_data", "_pos", "_sock", "_tls")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0
        self._tls = isinstance(sock, ssl.SSLSocket)

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(max(bufsize, _READ_AHEAD))
            if len(data) <= bufsize:
                return bytes(data)
            self._data, self._pos = data, 0
        end = self._pos + bufsize
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def pending(self) -> int:
        mine = max(0, len(self._data) - self._pos)
        return mine + int(self._sock.pending()) if self._tls else mine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(paho.Client):
    """paho's client, tuned for a stream of small QoS 1 messages (benchmarks/telemetry_ingest.py).

    - a read-ahead buffer on plain TCP sockets (see `_BufferedSocket`);
    - `loop_read` goes on through the packets already buffered instead of one `select()` per packet;
    - acknowledgements waiting to be written go out in one `send()` rather than one each, and paho's
      wake-up byte (one more `send()` per packet) is skipped for them on paho's own, already awake, thread.
    Each is a small override of paho's loop; with another paho (no `_create_socket`) plain paho is used.
    `tls_error` keeps the last TLS failure (handshake or read), which paho itself only logs.
    """

    tls_error: BaseException | None = None

    def _create_socket(self) -> Any:
        try:
            sock = super()._create_socket()
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.tls_error = exc
            raise
        if isinstance(sock, socket.socket):  # TCP or TLS; not websockets
            return _BufferedSocket(sock)
        return sock

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        # paho's own leaves the socket open when the handshake fails (a ResourceWarning per refused attempt).
        # Our context checks the host name itself (`check_hostname`), as paho's does when the context asks.
        context = self._ssl_context
        if context is None:
            return super()._ssl_wrap_socket(tcp_sock)
        ssl_sock = context.wrap_socket(tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except ssl.SSLError as exc:  # not "want read/write": paho turns those into BlockingIOError
            self.tls_error = exc
            raise

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(_MAX_BATCH):
            sock = self._sock
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, _BufferedSocket) or not sock.pending():
                break
            rc = super().loop_read(max_packets)
        return rc

    def _send_puback(self, mid: int) -> MQTTErrorCode:
        if threading.current_thread() is not self._thread:
            return super()._send_puback(mid)
        pair, self._sockpairW = self._sockpairW, None
        try:
            return super()._send_puback(mid)
        finally:
            self._sockpairW = pair

    def _packet_write(self) -> MQTTErrorCode:
        out: Any = self._out_packet
        if len(out) > 1 and out[0]["pos"] == 0 and out[0]["command"] & 0xF0 == _PUBACK:
            batch: list[Any] = []
            while out and len(batch) < _MAX_BATCH and out[0]["pos"] == 0 and out[0]["command"] & 0xF0 == _PUBACK:
                batch.append(out.popleft())
            merged = dict(batch[0])
            merged["packet"] = b"".join(p["packet"] for p in batch)
            merged["to_process"] = len(merged["packet"])
            out.appendleft(merged)
        return super()._packet_write()


def _no_passphrase() -> bytes:
    """Instead of OpenSSL's prompt on the terminal (a service would hang at start): an encrypted key is an error."""
    raise ValueError("the private key is encrypted; the controller needs an unencrypted key file (mode 0600)")


def _tls_context(tls: MqttTls) -> ssl.SSLContext:
    """A client context: TLS 1.2+, the broker's certificate checked against `tls.ca` and its name against the host."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"MQTT TLS CA file {tls.ca} cannot be used ({exc})") from exc
    if tls.cert is not None:
        try:
            key = str(tls.key) if tls.key is not None else None
            context.load_cert_chain(str(tls.cert), key, password=_no_passphrase)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"MQTT TLS client certificate {tls.cert} and key {tls.key or tls.cert} cannot be used ({exc})"
            ) from exc
    return context


def _describe_tls(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        return f"the broker's certificate was refused: {why} (wrong CA file, or a host name it does not name?)"
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return f"{exc} (is the port a plaintext listener?)"
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return f"{exc} (does the broker require a client certificate?)"
    return str(exc)


class MqttClient:
    """One paho client with edgefleet's settings; see the module docstring."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        on_message: MessageHandler | None = None,
        subscriptions: Sequence[str] = (),
        protocol: Literal["auto", "5", "3.1.1"] = "auto",
        session_expiry_s: int = 7 * 24 * 3600,
        keepalive: int = 30,
        min_backoff_s: int = 1,
        max_backoff_s: int = 30,
        max_inflight: int = 1000,
        tls: MqttTls | None = None,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.tls = tls
        self._tls_context = _tls_context(tls) if tls is not None else None
        self.username, self.password = username, password
        self.on_message = on_message
        self.subscriptions = tuple(subscriptions)
        self.protocol = protocol
        self.session_expiry_s = session_expiry_s
        self.keepalive = keepalive
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.max_inflight = max_inflight
        self._connected = threading.Event()
        self._answered = threading.Event()
        self._refusal: str | None = None
        self._unsupported = False
        self._client: paho.Client | None = None
        self.is_mqtt5 = False
        self.handler_errors = 0
        # tracked publishes: mid -> (qos, connection epoch, callback); guarded by _tracked_lock (never held while
        # calling back)
        self._tracked: dict[int, tuple[int, int, DoneCallback]] = {}
        self._tracked_lock = threading.RLock()
        self._epoch = 0
        self.callback_errors = 0

    # ------------------------------------------------------------------ connection
    def _make(self, mqtt5: bool) -> paho.Client:
        # paho 2.x builds its socket in `_create_socket`; where a future paho renames it, plain paho is used.
        factory = _Client if hasattr(paho.Client, "_create_socket") else paho.Client
        client = factory(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if mqtt5 else False,
            reconnect_on_failure=True,
        )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        client.reconnect_delay_set(self.min_backoff_s, self.max_backoff_s)
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(0)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
            client.on_connect_fail = self._on_connect_fail
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_publish = self._on_publish
        return client

    def connect(self, *, timeout: float = 10.0) -> None:
        """Connect and start the network thread; raises MqttError if the broker refuses or does not answer."""
        attempts = [True, False] if self.protocol == "auto" else [self.protocol == "5"]
        for mqtt5 in attempts:
            self._answered.clear()
            self._refusal, self._unsupported = None, False
            client = self._make(mqtt5)
            properties = None
            if mqtt5:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self.session_expiry_s
            try:
                if mqtt5:
                    client.connect_async(
                        self.host, self.port, keepalive=self.keepalive, clean_start=False, properties=properties
                    )
                else:
                    client.connect_async(self.host, self.port, keepalive=self.keepalive)
            except (OSError, ValueError) as exc:
                raise MqttError(f"cannot connect to MQTT broker {self.host}:{self.port} ({exc})") from exc
            self._client = client
            client.loop_start()
            answered = self._answered.wait(timeout)
            if answered and self._connected.is_set():
                self.is_mqtt5 = mqtt5
                return
            client.loop_stop()
            client.disconnect()
            self._client = None
            if not answered:
                raise MqttError(f"MQTT broker {self.host}:{self.port} did not answer within {timeout:g}s")
            if not (self._unsupported and mqtt5 and self.protocol == "auto"):
                hint = ""
                if self.username is None:
                    hint = (
                        " (no MQTT login given: run `edgefleet broker config` before the first `serve` so the "
                        "controller has its broker account, or set mqtt_username/mqtt_password)"
                    )
                raise MqttError(f"MQTT broker {self.host}:{self.port} refused the connection: {self._refusal}{hint}")
            log.info("broker %s:%s does not speak MQTT 5; using 3.1.1", self.host, self.port)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        client.loop_stop()
        self._connected.clear()

    # ------------------------------------------------------------------ callbacks (paho's thread)
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):  # a unix socket has no Nagle to turn off
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            self._unsupported = reason.value in {_UNSUPPORTED_PROTOCOL, 1}
            self._answered.set()
            return
        # paho calls this again after every reconnect; subscribing again is harmless with a kept session
        # and needed when the broker lost it.
        if self.subscriptions:
            client.subscribe([(topic, 1) for topic in self.subscriptions])
        self._release_lost_qos0()
        self._connected.set()
        self._answered.set()
        log.info("connected to %s:%s (session present: %s)", self.host, self.port, flags.session_present)

    def _tls_refused(self, client: paho.Client) -> bool:
        error = getattr(client, "tls_error", None)
        if error is None:
            return False
        client.tls_error = None  # type: ignore[attr-defined]
        self._refusal = f"TLS failed: {_describe_tls(error)}"
        log.warning("MQTT over TLS to %s:%s: %s; retrying with backoff", self.host, self.port, self._refusal)
        self._answered.set()  # connect() reports it at once
        return True

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._tls_refused(client)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()
        if self._tls_refused(client):
            return
        if reason.is_failure:
            log.warning("disconnected from %s:%s (%s); reconnecting with backoff", self.host, self.port, reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        handler = self.on_message
        if handler is None:
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", errors="replace")
        try:
            handler(topic, bytes(message.payload))
        except Exception:
            self.handler_errors += 1
            log.exception("message handler failed on %s", topic)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._tracked_lock:
            entry = self._tracked.pop(mid, None)
        if entry is not None:
            self._call_done(entry[2], mid)

    def _call_done(self, callback: DoneCallback, mid: int) -> None:
        try:
            callback(mid)
        except Exception:
            self.callback_errors += 1
            log.exception("publish completion callback failed for message %s", mid)

    def _release_lost_qos0(self) -> None:
        # paho clears its outgoing packet queue on reconnect: QoS 0 messages still waiting there were never
        # written and will never be reported. Tell their senders now, so a window counting them does not leak.
        with self._tracked_lock:
            self._epoch += 1
            lost = [(mid, e[2]) for mid, e in self._tracked.items() if e[0] == 0 and e[1] < self._epoch]
            for mid, _ in lost:
                del self._tracked[mid]
        for mid, callback in lost:
            self._call_done(callback, mid)

    @property
    def tracked(self) -> int:
        """Tracked publishes not yet reported done."""
        with self._tracked_lock:
            return len(self._tracked)

    # ------------------------------------------------------------------ publishing
    def publish_tracked(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        on_done: DoneCallback,
        retain: bool = False,
    ) -> int | None:
        """Publish without waiting; `on_done(mid)` when done (see the module docstring). Returns the message id.

        None means the message will not be reported: a QoS 0 message while disconnected (paho drops it), or paho
        refused it (its 65,535 message ids are all in use). Raises MqttError before `connect()`.
        """
        client = self._client
        if client is None:
            raise MqttError("not connected: call connect() first")
        # Lock order: paho's out-message lock (held by paho when it reports a QoS 1 acknowledgement), then ours
        # (taken by `_on_publish` for every report, QoS 0 ones included). Holding both across `publish` means no
        # report can be handled between paho assigning the id and our recording it.
        paho_lock = getattr(client, "_out_message_mutex", None)
        if paho_lock is None:  # another paho: register after the fact (a report racing it is missed, not fatal)
            info = client.publish(topic, payload, qos=qos, retain=retain)
            return self._track(info, qos, on_done)
        with paho_lock, self._tracked_lock:
            info = client.publish(topic, payload, qos=qos, retain=retain)
            return self._track(info, qos, on_done)

    def _track(self, info: paho.MQTTMessageInfo, qos: int, on_done: DoneCallback) -> int | None:
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and (qos == 0 or info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN):
            return None  # QoS 0 not sent, or refused outright; QoS 1 while offline is kept and sent on reconnect
        with self._tracked_lock:
            self._tracked[info.mid] = (qos, self._epoch, on_done)
        return int(info.mid)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        timeout: float | None = 10.0,
    ) -> None:
        """Publish and, for QoS > 0 with a timeout, wait for the broker's acknowledgement."""
        client = self._client
        if client is None:
            raise MqttError("not connected: call connect() first")
        properties = None
        if expiry_s is not None and self.is_mqtt5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = max(1, int(expiry_s))
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in {MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN}:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos and timeout is not None:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                raise MqttError(f"publish to {topic} failed: {exc}") from exc
            if not info.is_published():
                raise MqttError(f"the broker did not acknowledge the publish to {topic} within {timeout:g}s")
