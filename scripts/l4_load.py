"""Pushes BYTES bytes through a TCP proxy to a sink of our own and checks they all arrived.

Usage: l4_load.py PROXY_PORT SINK_PORT BYTES [cold|hot]
The sink listens on 127.0.0.1:SINK_PORT (the proxy's upstream); the source connects to
127.0.0.1:PROXY_PORT, sends BYTES, half-closes, and waits for the sink to see the end.
Both ends keep their own CPU low: the sink splice(2)s into a pipe it drains to /dev/null.
"cold" (the default) sendfile(2)s from a 64 MiB file in /dev/shm, so the payload a proxy
touches is not in its cache, as bytes from a network card are not; "hot" sends one 4 MiB
buffer again and again, which stays in cache and flatters a proxy that copies.
Prints "<bytes received> <seconds>"; exits 1 when the count is wrong or a side fails.
"""
import os
import socket
import sys
import tempfile
import threading
import time

proxy_port, sink_port, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
hot = len(sys.argv) > 4 and sys.argv[4] == "hot"
BLOCK = 64 << 20

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", sink_port))
listener.listen(1)
received = [0]


def sink():
    conn, _ = listener.accept()
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_WRONLY)
    while True:
        n = os.splice(conn.fileno(), w, 1 << 20)
        if n == 0:
            break
        received[0] += n
        left = n
        while left:
            left -= os.splice(r, null, left)
    conn.close()


# The source's bytes: a block of a repeating pattern, sent again and again.
if hot:
    block = memoryview(bytes(range(256)) * (4 << 20 >> 8))
else:
    shm = tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    shm.write(bytes(range(256)) * (BLOCK // 256))
    shm.flush()

t = threading.Thread(target=sink)
t.start()
start = time.monotonic()
src = socket.create_connection(("127.0.0.1", proxy_port))
left = total
while left > 0:
    if hot:
        n = min(left, len(block))
        src.sendall(block[:n])
    else:
        offset = 0
        n = min(left, BLOCK)
        while offset < n:
            offset += os.sendfile(src.fileno(), shm.fileno(), offset, n - offset)
    left -= n
src.shutdown(socket.SHUT_WR)
t.join(timeout=120)
elapsed = time.monotonic() - start
src.close()
listener.close()
print(received[0], f"{elapsed:.3f}")
sys.exit(0 if received[0] == total and not t.is_alive() else 1)
