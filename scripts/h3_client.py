"""An HTTP/3 client on aioquic (an implementation independent of fluxgate's quinn and h3)
for the tests: makes requests on one QUIC connection and prints one JSON line per answer.

Usage: h3_client.py --port P --ca CA.pem [--name localhost] [--connect-timeout S]
                    [--resume [--hold-handshake MS]] REQUEST...
REQUEST is "GET /path" or "POST /path BYTES" (BYTES of a repeating pattern as the body).
--resume: a first connection (GET /) to get a session ticket, then the requests on a
second one that resumes it and sends them as 0-RTT data, without waiting for its handshake;
"early_data" in each line then says whether 0-RTT was accepted. --hold-handshake: the
second connection goes through a UDP relay that holds the client's Handshake packets (its
Finished) back this long, so the server's handshake ends that much later.
Each line: {"sent_sha256": "...", "status": 200, "headers": {...}, "body_len": N, "body_sha256": "...",
"trailers": {...}} or {"error": "..."} when the stream was reset or the connection closed.
"""
import argparse
import asyncio
import hashlib
import json
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset


def pattern(n):
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.streams = {}
        self.goaway = None
        self.closed = None
        # aioquic drops GOAWAY's payload: the server's uni streams are read here too, and
        # the control stream's (type 0x00) frames looked at.
        self.uni = {}

    def read_goaway(self, sid, data):
        raw = self.uni.setdefault(sid, bytearray())
        raw += data
        if not raw or raw[0] != 0x00:
            return
        i = 1
        try:
            while i < len(raw):
                kind, i = varint(raw, i)
                size, i = varint(raw, i)
                if i + size > len(raw):
                    return
                if kind == 0x7:
                    self.goaway = varint(raw, i)[0]
                i += size
        except IndexError:
            return

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived) and event.stream_id % 4 == 3:
            self.read_goaway(event.stream_id, event.data)
        if isinstance(event, StreamReset) and event.stream_id in self.streams:
            self.finish(event.stream_id, error=f"stream reset {event.error_code}")
        if isinstance(event, ConnectionTerminated):
            self.closed = {"closed": event.error_code, "reason": event.reason_phrase}
            for sid in list(self.streams):
                self.finish(sid, error=f"connection closed {event.error_code} {event.reason_phrase}")
        for e in self.h3.handle_event(event):

            st = self.streams.get(getattr(e, "stream_id", None))
            if st is None:
                continue
            if isinstance(e, HeadersReceived):
                fields = {k.decode(): v.decode() for k, v in e.headers}
                if "status" not in st:
                    st["status"] = int(fields.pop(":status"))
                    st["headers"] = fields
                else:
                    st["trailers"] = fields
            elif isinstance(e, DataReceived):
                st["body"] += e.data
            if e.stream_ended:
                self.finish(e.stream_id)

    def finish(self, sid, error=None):
        st = self.streams.pop(sid)
        if error:
            out = {"error": error}
        else:
            out = {
                "sent_sha256": st["sent"],
                "status": st.get("status"),
                "headers": st.get("headers", {}),
                "body_len": len(st["body"]),
                "body_sha256": hashlib.sha256(st["body"]).hexdigest(),
                "trailers": st.get("trailers", {}),
            }
        if not st["done"].done():
            st["done"].set_result(out)

    async def request(self, method, path, authority, body, extra=()):
        sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        headers += [tuple(h.encode().split(b"=", 1)) for h in extra]
        done = asyncio.get_running_loop().create_future()
        sent = hashlib.sha256(body or b"").hexdigest()
        self.streams[sid] = {"body": b"", "done": done, "sent": sent}
        self.h3.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(done, 20)


def has_handshake_packet(d):
    """Whether a datagram holds a long-header Handshake packet (RFC 9000 17.2)."""
    i = 0
    while i < len(d) and d[i] & 0x80:
        kind = (d[i] & 0x30) >> 4
        if kind == 2:
            return True
        j = i + 5
        j += 1 + d[j]  # destination connection id
        j += 1 + d[j]  # source connection id
        if kind == 0:  # Initial: token
            n, j = varint(d, j)
            j += n
        n, j = varint(d, j)
        i = j + n
    return False


def varint(d, j):
    first = d[j]
    size = 1 << (first >> 6)
    v = first & 0x3F
    for k in range(1, size):
        v = (v << 8) | d[j + k]
    return v, j + size


class Relay(asyncio.DatagramProtocol):
    """Client <-> 127.0.0.1:server; holds the client's Handshake datagrams until `until`.
    With `first_only`, passes only the client's first datagram on (an address that never
    answers) and counts the bytes each way."""

    def __init__(self, server_port, hold, first_only=False):
        self.server = ("127.0.0.1", server_port)
        self.hold = hold
        self.until = None
        self.client = None
        self.first_only = first_only
        self.sent = 0
        self.received = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        loop = asyncio.get_running_loop()
        if addr == self.server:
            self.received += len(data)
            if not self.first_only:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if self.first_only:
            if self.sent == 0:
                self.sent = len(data)
                self.transport.sendto(data, self.server)
            return
        if has_handshake_packet(data):
            if self.until is None:
                self.until = loop.time() + self.hold
            wait = self.until - loop.time()
            if wait > 0:
                loop.call_later(wait, self.transport.sendto, data, self.server)
                return
        self.transport.sendto(data, self.server)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--name", default="localhost")
    p.add_argument("--connect-timeout", type=float, help="give up on a silent server after this")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--header", action="append", default=[], help="NAME=VALUE on every request")
    p.add_argument("--pause", type=float, help="one request at a time, this long between")
    p.add_argument("--hold-handshake", type=float, default=0)
    p.add_argument(
        "--wait-close", type=float,
        help="then wait this long for the server to close; print the GOAWAY and the close",
    )
    p.add_argument(
        "--amplification", type=float,
        help="send one Initial, answer nothing for this many seconds, print bytes each way",
    )
    p.add_argument("requests", nargs="+")
    a = p.parse_args()
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.name)
    cfg.load_verify_locations(a.ca)
    if a.connect_timeout:
        cfg.idle_timeout = a.connect_timeout
    authority = f"{a.name}:{a.port}"
    port = a.port
    if a.amplification:
        loop = asyncio.get_running_loop()
        transport, relay = await loop.create_datagram_endpoint(
            lambda: Relay(a.port, 0, first_only=True), local_addr=("127.0.0.1", 0)
        )
        cfg.idle_timeout = a.amplification
        try:
            async with connect(
                "127.0.0.1", transport.get_extra_info("sockname")[1], configuration=cfg,
                create_protocol=Client,
            ):
                pass
        except ConnectionError:
            pass
        print(json.dumps({"sent": relay.sent, "received": relay.received}), flush=True)
        return
    if a.resume:
        tickets = []
        async with connect(
            "127.0.0.1", a.port, configuration=cfg, create_protocol=Client,
            session_ticket_handler=tickets.append,
        ) as c:
            await c.request("GET", "/", authority, None)
            for _ in range(50):
                if tickets:
                    break
                await asyncio.sleep(0.02)
        if not tickets:
            sys.exit("no session ticket")
        cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.name)
        cfg.load_verify_locations(a.ca)
        cfg.session_ticket = tickets[-1]
        if a.hold_handshake:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Relay(a.port, a.hold_handshake / 1000), local_addr=("127.0.0.1", 0)
            )
            port = transport.get_extra_info("sockname")[1]
    async with connect(
        "127.0.0.1", port, configuration=cfg, create_protocol=Client,
        wait_connected=not a.resume,
    ) as c:
        def start(r):
            return asyncio.ensure_future(
                c.request(
                    r.split()[0], r.split()[1], authority,
                    pattern(int(r.split()[2])) if r.startswith("POST") else None,
                    a.header,
                )
            )

        async def one_by_one():
            for i, r in enumerate(a.requests):
                if i:
                    await asyncio.sleep(a.pause)
                f = start(r)
                await asyncio.wait([f])
                yield f

        async def all_at_once():
            for f in [start(r) for r in a.requests]:
                yield f

        async for f in (one_by_one() if a.pause else all_at_once()):
            try:
                out = await f
            except asyncio.TimeoutError:
                out = {"error": "timeout"}
            if a.resume:
                out["early_data"] = c._quic.tls.early_data_accepted
            out["retried"] = c._quic._retry_count
            print(json.dumps(out), flush=True)
        if a.wait_close:
            for _ in range(int(a.wait_close / 0.02)):
                if c.closed:
                    break
                await asyncio.sleep(0.02)
            print(json.dumps({"goaway": c.goaway, **(c.closed or {"closed": None})}), flush=True)


asyncio.run(main())
