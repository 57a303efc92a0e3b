"""`fleetp2p` entry point: subcommands, one-line errors, exit codes.

Exit codes: 0 ok, 1 operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from fleetp2p import __version__, config
from fleetp2p.errors import ConfigError, FleetError

def _agent(args: argparse.Namespace) -> int:
    from fleetp2p.agent import serve

    cfg = config.load(args.config, config.flag_overrides(args))
    _setup_logging(cfg.log_level)
    if cfg.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(cfg))
    else:
        asyncio.run(serve(cfg))
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetp2p", description="Peer-to-peer OCI blob distribution for machine fleets.")
    parser.add_argument("--version", action="version", version=f"fleetp2p {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    agent = sub.add_parser("agent", help="run the agent: a local OCI pull-through mirror",
                           description="Run the agent. Every config key can be given as a flag.")
    agent.add_argument("--config", "-c", metavar="FILE", help="TOML config file")
    config.add_flags(agent)
    agent.set_defaults(func=_agent)
    import tracker.__main__ as tracker_cli

    tracker = sub.add_parser("tracker", help="run a standalone tracker (memory or Redis backend)",
                             description="Run a tracker; several on one Redis act as one.")
    tracker_cli.add_arguments(tracker)
    tracker.set_defaults(func=tracker_cli.run_from_args)
    from fleetp2p.cli import doctor, files, seed, status

    seed.add_parsers(sub)
    files.add_parsers(sub)
    status.add_parser(sub)
    doctor.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fleetp2p: config error: {e}", file=sys.stderr)
        return 2
    except FleetError as e:
        if args.debug:
            raise
        print(f"fleetp2p: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
