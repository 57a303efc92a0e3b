"""A rate-limited TCP relay standing in for a registry behind a slower link.

    python bench/throttle.py --listen PORT --target HOST:PORT --rate BYTES_PER_SECOND

On one machine the registry answers at memory speed, so a cold pull measures
CPU, not the link a real mirror sits behind. Shaping loopback with `tc` would
slow the agent → client side too (same interface) and change the machine for
everyone; this relay slows only what passes through it. All connections share
one token bucket, like flows sharing one link. Only the download direction
(target → client) is limited.
"""

from __future__ import annotations

import argparse
import asyncio
import time

CHUNK = 64 * 1024


class TokenBucket:
    """`rate` bytes per second with a burst of `burst` bytes."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # first come, first served across connections
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               bucket: TokenBucket | None) -> None:
    try:
        while data := await reader.read(CHUNK):
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(port: int, target_host: str, target_port: int, rate: float) -> None:
    bucket = TokenBucket(rate, burst=max(CHUNK, rate / 100))  # ~10 ms of burst

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w, None), pipe(up_r, client_w, bucket))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--rate", type=float, required=True, help="bytes per second")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    try:
        asyncio.run(serve(args.listen, host, int(port), args.rate))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
