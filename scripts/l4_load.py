"""Pushes BYTES bytes through a TCP proxy to a sink of our own and checks they all arrived.

Usage: l4_load.py PROXY_PORT SINK_PORT BYTES
The sink listens on 127.0.0.1:SINK_PORT (the proxy's upstream); the source connects to
127.0.0.1:PROXY_PORT, sends BYTES, half-closes, and waits for the sink to see the end.
Prints "<bytes received> <seconds>"; exits 1 when the count is wrong or a side fails.
"""
import socket
import sys
import threading
import time

proxy_port, sink_port, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CHUNK = 4 << 20

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", sink_port))
listener.listen(1)
received = [0]


def sink():
    conn, _ = listener.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        received[0] += n
    conn.close()


t = threading.Thread(target=sink)
t.start()
payload = memoryview(bytes(range(256)) * (CHUNK // 256))
start = time.monotonic()
src = socket.create_connection(("127.0.0.1", proxy_port))
left = total
while left > 0:
    n = min(left, CHUNK)
    src.sendall(payload[:n])
    left -= n
src.shutdown(socket.SHUT_WR)
t.join(timeout=120)
elapsed = time.monotonic() - start
src.close()
listener.close()
print(received[0], f"{elapsed:.3f}")
sys.exit(0 if received[0] == total and not t.is_alive() else 1)
