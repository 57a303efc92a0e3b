"""`fleetp2p ls REF` and `fleetp2p get REF PATH`: an image's files, read lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fleetp2p.cli.agentclient import UsageError, add_agent_flag, run_command
from fleetp2p.cli.imagefiles import (MirrorReader, extract_from_layer, find, image_layers,
                                     list_entries, write_lazy_file)
from fleetp2p.errors import FleetError
from fleetp2p.oci.reference import ImageRef


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("ls", help="list the files of an image's lazy layers (from their TOCs)",
                        description="List files of eStargz / zstd:chunked layers by reading only "
                                    "their TOCs through the agent.")
    _common(ls)
    ls.set_defaults(func=lambda args: run_command(args, _ls))
    get = sub.add_parser("get", help="write one file of an image, fetching only its chunks",
                         description="Fetch one file's chunks through the agent, verify each, and "
                                     "write the file. Plain gzip layers are fetched whole.")
    _common(get)
    get.add_argument("path", metavar="PATH", help="path of the file inside the image")
    get.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    get.set_defaults(func=lambda args: run_command(args, _get))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="REF", help="[registry/]repository[:tag|@digest]")
    parser.add_argument("--platform", metavar="OS/ARCH", help="platform to pick from an index")
    parser.add_argument("--registry", metavar="HOST", default="docker.io",
                        help="registry for references without one (default docker.io)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_agent_flag(parser)


def _reader(args: argparse.Namespace) -> MirrorReader:
    try:
        ref = ImageRef.parse(args.ref, default_registry=args.registry)
    except FleetError as e:
        raise UsageError(f"invalid reference {args.ref!r}: {e}") from None
    return MirrorReader(args.agent, ref)


def _ls(args: argparse.Namespace) -> int:
    reader = _reader(args)
    layers = image_layers(reader, args.platform)
    rows = list(list_entries(layers, reader))
    if args.json:
        json.dump({"ref": str(reader.ref), "entries": rows, "bytes_fetched": reader.fetched},
                  sys.stdout)
        print()
        return 0
    for row in rows:
        if not row["lazy"]:
            print(f"# layer {row['layer'][:19]}… is not lazily readable ({row['media_type']})")
            continue
        link = f" -> {row['link']}" if row["link"] else ""
        print(f"{row['type']:8} {row['mode']:>8} {row['size']:>12}  {row['path']}{link}")
    print(f"# {sum(1 for r in rows if r['lazy'])} entries; read {reader.fetched} bytes of TOCs",
          file=sys.stderr)
    return 0


def _get(args: argparse.Namespace) -> int:
    reader = _reader(args)
    layers = image_layers(reader, args.platform)
    layer, entry = find(layers, args.path, reader)
    if entry is not None and entry.type not in ("reg", "hardlink"):
        raise FleetError(f"{args.path} is a {entry.type}, not a regular file")
    to_stdout = not args.output
    out = sys.stdout.buffer if to_stdout else open(args.output + ".part", "wb")
    started = time.monotonic()
    progress = _Progress(quiet=args.json or to_stdout, total=None)
    try:
        if entry is not None:
            progress.total = entry.size
            size = write_lazy_file(reader, layer, entry, out, progress.add)
            mode = "lazy"
        else:
            print(f"fleetp2p: layer {layer.digest[:19]}… is plain {layer.media_type.rsplit('.', 1)[-1]}"
                  f": fetching the whole layer ({layer.size} bytes)", file=sys.stderr)
            progress.total = layer.size
            found = extract_from_layer(reader, layer, args.path, out, progress.add)
            if found is None:
                raise FleetError(f"{args.path}: no such file in the image")
            size, mode = found, "whole-layer"
        if not to_stdout:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(args.output + ".part", args.output)
    except BaseException:
        if not to_stdout:
            out.close()
            try:
                os.unlink(args.output + ".part")
            except FileNotFoundError:
                pass
        raise
    finally:
        progress.close()
    summary = {"ref": str(reader.ref), "path": args.path, "size": size, "mode": mode,
               "layer": layer.digest, "bytes_fetched": reader.fetched,
               "seconds": round(time.monotonic() - started, 3)}
    if args.json:
        json.dump(summary, sys.stdout)
        print()
    elif not to_stdout:
        print(f"wrote {args.output}: {size} bytes ({mode}), fetched {reader.fetched} bytes "
              f"in {summary['seconds']} s", file=sys.stderr)
    return 0


class _Progress:
    """A rich bar on a terminal's stderr; nothing when quiet or not a terminal."""

    def __init__(self, quiet: bool, total: int | None) -> None:
        self.total = total
        self._bar = None
        self._task = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress, TransferSpeedColumn)
            self._bar = Progress("fetching", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 transient=True)
            self._bar.start()

    def add(self, n: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task("get", total=self.total)
        self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
