#!/usr/bin/env python3
"""Opens N keep-alive connections to HOST:PORT, makes one GET on each, then holds them idle.
Prints "ready" once every connection has had its response; closes them all when stdin
closes. Used by scripts/bench.sh to measure fluxgate's memory per idle connection."""
import asyncio
import sys


async def one(host, port, answered, idle):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    answered.append(1)
    await idle.wait()
    writer.close()


async def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    answered, idle = [], asyncio.Event()
    tasks = []
    # At most 100 requests in flight, so the proxy's upstream pool stays small and what is
    # measured is the cost of the idle client connections.
    for i in range(n):
        tasks.append(asyncio.create_task(one(host, port, answered, idle)))
        while len(tasks) - len(answered) >= 100:
            await asyncio.sleep(0.005)
    for _ in range(1200):
        if len(answered) == n:
            break
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            print(f"failed: {failed[0].exception()!r}", flush=True)
            sys.exit(1)
        await asyncio.sleep(0.05)
    print("ready" if len(answered) == n else f"only {len(answered)} of {n}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    idle.set()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
