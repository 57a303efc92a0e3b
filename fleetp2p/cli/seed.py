"""`fleetp2p seed REF` and `fleetp2p pull REF`: make the agent hold a reference.

Both ask the agent to resolve the reference and fetch every blob it needs;
`seed` also pins them against GC (and `seed --unpin` releases them). The
agent does the work with its own credentials; this module only validates the
command line and renders the agent's progress events.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from fleetp2p.cli.agentclient import AgentClient, UsageError, add_agent_flag, run_command
from fleetp2p.cli.progress import make_view
from fleetp2p.errors import FleetError
from fleetp2p.oci.reference import ImageRef


def add_parsers(sub: argparse._SubParsersAction) -> None:
    seed = sub.add_parser(
        "seed", help="fetch, verify and pin every blob of an image, index or artifact",
        description="Make the agent fetch and verify every blob REF needs (config, layers, child "
                    "manifests) and pin them against GC. Running it again fetches nothing.")
    _common(seed)
    seed.add_argument("--unpin", action="store_true",
                      help="release the pin of an earlier seed of REF instead (GC may then evict)")
    seed.set_defaults(func=lambda args: run_command(args, _seed))

    pull = sub.add_parser(
        "pull", help="fetch and verify every blob of an image, index or artifact (no pin)",
        description="Make the agent fetch and verify every blob REF needs, without pinning.")
    _common(pull)
    pull.set_defaults(func=lambda args: run_command(args, _pull))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="REF",
                        help="[registry/]repository[:tag|@digest]; the registry defaults to the "
                             "agent's default_registry")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]", default=[],
                       help="platform to take from an index (repeatable; default: the agent's own)")
    group.add_argument("--all-platforms", action="store_true",
                       help="take every manifest of an index")
    add_agent_flag(parser)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("-q", "--quiet", action="store_true",
                     help="print only the resolved name@digest")
    out.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _seed(args: argparse.Namespace) -> int:
    if args.unpin:
        _check_ref(args.ref)
        result = AgentClient(args.agent).unpin(args.ref)
        if args.json:
            print(json.dumps(result))
        elif not args.quiet:
            print(f"unpinned {result['unpinned']}: {result['digests']} digests may now be "
                  "evicted by GC")
        return 0
    return _transfer(args, pin=True)


def _pull(args: argparse.Namespace) -> int:
    return _transfer(args, pin=False)


def _transfer(args: argparse.Namespace, pin: bool) -> int:
    _check_ref(args.ref)
    for platform in args.platform:
        parts = platform.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {platform!r}: expected os/arch[/variant], "
                             "e.g. linux/amd64")
    client = AgentClient(args.agent)
    console = Console(file=sys.stdout, highlight=False)
    view = make_view(console, "seeded" if pin else "pulled", args.quiet, args.json)
    try:
        for event in client.pull(args.ref, args.platform, args.all_platforms, pin):
            view.event(event)
    finally:
        view.close()
    return 0


def _check_ref(text: str) -> None:
    """Syntax only: which registry a short name means is the agent's call."""
    try:
        ImageRef.parse(text)
    except FleetError as e:
        raise UsageError(f"invalid reference {text!r}: {e}") from None
