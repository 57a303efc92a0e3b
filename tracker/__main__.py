"""`python -m tracker --listen HOST:PORT [--redis URL] [--token T]` (same as `fleetp2p tracker`).

The token can also come from $FLEETP2P_TRACKER_TOKEN or --token-file, so it
need not show up in `ps`.
"""

from __future__ import annotations

import argparse
import logging
import os

from tracker.backend import Timeouts
from tracker.run import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT to serve the API on")
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="redis://host:port/db to share state between tracker replicas")
    parser.add_argument("--redis-prefix", default="fleetp2p", help="key prefix in Redis")
    parser.add_argument("--token", default=os.environ.get("FLEETP2P_TRACKER_TOKEN"),
                        help="require Authorization: Bearer TOKEN on /v1/ (env FLEETP2P_TRACKER_TOKEN)")
    parser.add_argument("--token-file", default=None, help="read the token from this file")
    parser.add_argument("--lease-ttl", type=float, default=15.0, help="segment fetch lease seconds")
    parser.add_argument("--announce-ttl", type=float, default=30.0, help="node liveness seconds")
    parser.add_argument("--lease-limit", type=int, default=Timeouts.lease_limit,
                        help="live upstream-fetch leases per blob at once (0: no limit); "
                             "about upstream rate / node link rate")
    parser.add_argument("--log-level", default="info")


def run_from_args(args: argparse.Namespace) -> int:
    if args.lease_limit < 0:
        raise SystemExit("fleetp2p tracker: --lease-limit must be 0 (no limit) or more")
    token = args.token
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(args.listen, args.redis, token, lease_ttl=args.lease_ttl,
            announce_ttl=args.announce_ttl, lease_limit=args.lease_limit,
            redis_prefix=args.redis_prefix)
    except ValueError as e:  # a bad --listen
        raise SystemExit(f"fleetp2p tracker: {e}") from None
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleetp2p tracker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
