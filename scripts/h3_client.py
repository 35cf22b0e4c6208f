"""An HTTP/3 client on aioquic (an implementation independent of fluxgate's quinn and h3)
for the tests: makes requests on one QUIC connection and prints one JSON line per answer.

Usage: h3_client.py --port P --ca CA.pem [--name localhost] [--connect-timeout S] REQUEST...
REQUEST is "GET /path" or "POST /path BYTES" (BYTES of a repeating pattern as the body).
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
from aioquic.quic.events import ConnectionTerminated, StreamReset


def pattern(n):
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.streams = {}

    def quic_event_received(self, event):
        if isinstance(event, StreamReset) and event.stream_id in self.streams:
            self.finish(event.stream_id, error=f"stream reset {event.error_code}")
        if isinstance(event, ConnectionTerminated):
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

    async def request(self, method, path, authority, body):
        sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        done = asyncio.get_running_loop().create_future()
        sent = hashlib.sha256(body or b"").hexdigest()
        self.streams[sid] = {"body": b"", "done": done, "sent": sent}
        self.h3.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(done, 20)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--name", default="localhost")
    p.add_argument("--connect-timeout", type=float, help="give up on a silent server after this")
    p.add_argument("requests", nargs="+")
    a = p.parse_args()
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.name)
    cfg.load_verify_locations(a.ca)
    if a.connect_timeout:
        cfg.idle_timeout = a.connect_timeout
    async with connect("127.0.0.1", a.port, configuration=cfg, create_protocol=Client) as c:
        for r in a.requests:
            parts = r.split()
            body = pattern(int(parts[2])) if parts[0] == "POST" else None
            try:
                out = await c.request(parts[0], parts[1], f"{a.name}:{a.port}", body)
            except asyncio.TimeoutError:
                out = {"error": "timeout"}
            print(json.dumps(out), flush=True)


asyncio.run(main())
