"""Lazy pull of one file: how many bytes and how much time reading a file of
about 1 % of an eStargz layer costs through a cold agent, against pulling
the whole layer through a cold agent on the same link.

    python bench/lazy.py [--size 512MiB] [--link 100mbit] [--file-size BYTES]
                         [--chunk-size 4MiB] [--compression-level 9]

Two hosts in network namespaces (tests/fleet/netns.py), each behind a link
shaped to --link in both directions: `registry` runs docker-registry, `client`
runs the agent and the clients. The layer is a --size eStargz layer of a few
thousand files (random contents, so its size is the size asked for) made by
ctr-remote and pushed as a one-layer image. One file of it, of --file-size
(default 0.9 % of the layer), sits in the middle of the layer.

Lazy: `fleetp2p get REF FILE` on the client host against a cold agent (empty
store, no peers). Bytes moved = the layer bytes the registry's access log says
it sent, plus the agent's `fleetp2p_lazy_fetched_bytes_total{source="peer"}`;
they are divided by what the read needs at least: the file's compressed chunks,
the TOC and the footer. Time = the wall time of the `fleetp2p get` process,
interpreter start-up included (what a user waits for).

Full: a fresh cold agent, one client GET of the whole layer through it (the
client hashes the body). Time = request to last byte, client-measured.

Targets: bytes moved <= 1.5 x the minimum, full_time / lazy_time >= 20.

Why ctr-remote and not tests/lazy/writers.py: the benchmark should measure the
layout that users' tooling produces (ctr-remote's chunking, TOC and landmark
files, what stargz-snapshotter reads), and ctr-remote streams the layer through
containerd's content store on disk while the test writer builds the whole blob
in memory (several times its size) with zlib in one Python thread.

Needs root, containerd, ctr, ctr-remote (stargz-snapshotter) and
docker-registry. Namespaces, processes, containerd and temp files are removed
on exit, Ctrl-C or SIGTERM; namespaces of a killed run go at the next start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
# tests/ first: `fleet` must be tests/fleet (the package), as in bench/fleet.py.
sys.path.insert(0, str(REPO_ROOT / "tests"))

from common import (human_bytes, interrupt_on_sigterm, parse_size, print_machine,  # noqa: E402
                    table)

from fleet.netns import Host, Network, network, rate_bits, unavailable  # noqa: E402
from fleet.pull import PullResult, blob_path, pull_all  # noqa: E402
from fleet.scene import Scene  # noqa: E402
from fleet.services import UpstreamRegistry, fleetp2p_command  # noqa: E402
from harness.containerd import Containerd, start_containerd  # noqa: E402
from harness.regclient import OCI_MANIFEST  # noqa: E402

from fleetp2p.lazy import TOC, TocLocation, detect, fetch_ranges  # noqa: E402

BYTES_TARGET = 1.5
SPEEDUP_TARGET = 20.0
REPO = "bench/lazy"
SOURCE_REF = "bench.local/lazy:src"
ESTARGZ_REF = "bench.local/lazy:esgz"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
# Everyday files: sizes log-uniform between these, spread over DIRS directories.
SMALLEST, LARGEST, DIRS = 512, 1 << 20, 64
MiB = 1 << 20


# The layer ------------------------------------------------------------------

@dataclass(frozen=True)
class SourceLayer:
    """The uncompressed tar ctr-remote converts, and the file the benchmark reads."""

    path: Path
    digest: str
    size: int
    files: int
    target: str
    target_size: int
    target_sha256: str


def _tar_entry(name: str, size: int, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = 0 if directory else size
    info.mtime = 1_700_000_000
    return info


class _RandomFile:
    """`size` random bytes read in pieces, hashed on the way: tarfile copies a member
    from a file object, and the target file's digest is needed to check the read."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.urandom(n)
        self.sha.update(data)
        self.left -= n
        return data


def write_source_tar(path: Path, size: int, target_size: int, seed: int = 1) -> SourceLayer:
    """A tar of about `size` bytes of files, streamed to disk file by file (the
    largest piece in memory is one read of tarfile's copy buffer)."""
    rng = random.Random(seed)
    target = "usr/share/bench/target.bin"
    target_sha = ""
    files = 0
    written = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ["usr/", "usr/share/", "usr/share/bench/",
                     *(f"usr/share/bench/d{d:02d}/" for d in range(DIRS))]:
            tar.addfile(_tar_entry(name, 0, directory=True))
        while written < size or not target_sha:
            if not target_sha and written >= (size - target_size) // 2:
                name, n = target, target_size  # mid-layer: neither first nor last
            else:
                n = int(math.exp(rng.uniform(math.log(SMALLEST), math.log(LARGEST))))
                name = f"usr/share/bench/d{files % DIRS:02d}/f{files:06d}.bin"
            contents = _RandomFile(n)
            tar.addfile(_tar_entry(name, n), contents)
            if name == target:
                target_sha = f"sha256:{contents.sha.hexdigest()}"
            written, files = written + n, files + 1
    with open(path, "rb") as f:
        digest = f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    return SourceLayer(path, digest, path.stat().st_size, files, target, target_size, target_sha)


def write_layout(root: Path, layer: SourceLayer) -> None:
    """A one-layer OCI image layout around the tar (moved in, not copied)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        (blobs / digest[7:]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    layer.path.rename(blobs / layer.digest[7:])
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": IMAGE_CONFIG, **put(config)},
        "layers": [{"mediaType": LAYER_TAR, "digest": layer.digest, "size": layer.size}]}).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": SOURCE_REF.rsplit(":", 1)[1]}}]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def import_layout(ctrd: Containerd, root: Path, log: Path) -> None:
    """`ctr image import -`, the archive streamed from the layout into its stdin
    (no second on-disk copy of the layer); ctr's output goes to `log`."""
    argv = ["ctr", "-a", str(ctrd.socket), "-n", "default", "image", "import", "--no-unpack",
            "--base-name", SOURCE_REF.rsplit(":", 1)[0], "-"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert proc.stdin is not None
            stdin: BinaryIO = proc.stdin
            with tarfile.open(fileobj=stdin, mode="w|") as tar:
                for path in sorted(root.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
            stdin.close()
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"ctr image import failed: {log.read_text(errors='replace')[-2000:]}")


def build_layer(net: Network, upstream: UpstreamRegistry, args: argparse.Namespace) -> SourceLayer:
    """Write the source tar, convert it with ctr-remote, push the eStargz image to
    the registry host's registry (from inside that host: a push is not measured,
    so it goes over the host's own interface, not the shaped link)."""
    work = net.workdir / "source"
    work.mkdir()
    t0 = time.monotonic()
    source = write_source_tar(work / "layer.tar", args.size, args.file_size)
    write_layout(work / "layout", source)
    print(f"  wrote a {human_bytes(source.size)} tar of {source.files} files "
          f"({time.monotonic() - t0:.1f} s)", flush=True)
    with start_containerd(snapshotter="native") as ctrd:
        t0 = time.monotonic()
        import_layout(ctrd, work / "layout", work / "import.log")
        shutil.rmtree(work / "layout")
        convert = ["ctr-remote", "-a", str(ctrd.socket), "-n", "default", "image", "convert",
                   "--oci", "--estargz", "--estargz-compression-level", str(args.compression_level)]
        if args.chunk_size:
            convert += ["--estargz-chunk-size", str(args.chunk_size)]
        subprocess.run([*convert, SOURCE_REF, ESTARGZ_REF], check=True, capture_output=True,
                       timeout=1800)
        print(f"  ctr-remote converted it to eStargz ({time.monotonic() - t0:.1f} s)", flush=True)
        upstream.host.run("ctr", "-a", str(ctrd.socket), "-n", "default", "image", "push",
                          "--plain-http", f"{upstream.name}/{REPO}:v1", ESTARGZ_REF, timeout=900)
    return source


@dataclass(frozen=True)
class LayerInfo:
    """The pushed eStargz layer and the minimum a reader of the target file needs."""

    digest: str
    size: int
    toc: TOC
    location: TocLocation
    footer: int
    chunks: int  # of the target file
    chunk_spans: list[tuple[int, int]]

    @property
    def toc_bytes(self) -> int:
        assert self.location.length is not None
        return self.location.length

    @property
    def chunk_bytes(self) -> int:
        return sum(e - s for s, e in self.chunk_spans)

    @property
    def minimum(self) -> int:
        return self.chunk_bytes + self.toc_bytes + self.footer


def inspect_layer(upstream: UpstreamRegistry, target: str) -> LayerInfo:
    """The layer as pushed: its descriptor from the registry's manifest, its footer
    and TOC read from the registry's storage file (so no GET shows in the log)."""
    resp = upstream.host.call(lambda: upstream.client().get_manifest(REPO, "v1", accept=OCI_MANIFEST))
    desc = json.loads(resp.body)["layers"][0]
    plan = detect(desc["mediaType"], desc.get("annotations"), desc["size"])
    if plan is None:
        raise RuntimeError(f"ctr-remote's layer is not lazily readable: {desc}")
    hex_ = desc["digest"].split(":", 1)[1]
    stored = upstream.workdir / "storage/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"
    with open(stored, "rb") as f:
        start, end = plan.first_range(desc["size"])
        f.seek(start)
        location = plan.parse_footer(f.read(end - start), desc["size"])
        assert location.end is not None
        f.seek(location.offset)
        toc = plan.parse_toc(f.read(location.end - location.offset), location)
    chunks = toc.chunks_for(target)
    return LayerInfo(desc["digest"], desc["size"], toc, location, end - start, len(chunks),
                     fetch_ranges(chunks))


# The two reads --------------------------------------------------------------

@dataclass
class LazyRead:
    seconds: float
    upstream_layer_bytes: int
    upstream_other_bytes: int  # manifests
    peer_bytes: float
    agent_upstream_bytes: float
    cli: dict
    verified: bool


def lazy_read(net: Network, upstream: UpstreamRegistry, client: Host, layer: LayerInfo,
              source: SourceLayer) -> LazyRead:
    scene = Scene(net, upstream, net.workdir / "scene-lazy")
    try:
        agent, = scene.start_agents([client], "embedded", log_level="info")
        out = scene.workdir / "target.out"
        mark = upstream.access_log.mark()
        t0 = time.monotonic()
        result = client.run(*fleetp2p_command("get", f"{upstream.name}/{REPO}:v1", source.target,
                                              "-o", str(out), "--agent", agent.url, "--json"),
                            timeout=600)
        seconds = time.monotonic() - t0
        with open(out, "rb") as f:
            got = f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
        upstream.access_log.settle()
        entries = upstream.access_log.entries(mark)
        layer_bytes = sum(e.size for e in entries if e.blob_digest == layer.digest and e.method == "GET")
        other = sum(e.size for e in entries if e.blob_digest != layer.digest and e.method == "GET")
        return LazyRead(seconds, layer_bytes, other,
                        agent.metric("fleetp2p_lazy_fetched_bytes_total", source="peer"),
                        agent.metric("fleetp2p_lazy_fetched_bytes_total", source="upstream"),
                        json.loads(result.stdout), got == source.target_sha256)
    except Exception:
        print(scene.report()[-20000:], file=sys.stderr)
        raise
    finally:
        scene.close()


def full_read(net: Network, upstream: UpstreamRegistry, client: Host,
              layer: LayerInfo, link_s: float) -> tuple[PullResult, int]:
    scene = Scene(net, upstream, net.workdir / "scene-full")
    try:
        scene.start_agents([client], "embedded", log_level="info")
        mark = upstream.access_log.mark()
        result, = pull_all([client], blob_path(REPO, layer.digest) + f"?ns={upstream.name}",
                           timeout=max(300.0, 4 * link_s))
        return result, upstream.blob_bytes(mark, {layer.digest})
    except Exception:
        print(scene.report()[-20000:], file=sys.stderr)
        raise
    finally:
        scene.close()


# Report ---------------------------------------------------------------------

def report(layer: LayerInfo, source: SourceLayer, lazy: LazyRead, full: PullResult,
           full_upstream: int) -> int:
    moved = lazy.upstream_layer_bytes + lazy.peer_bytes
    bytes_ratio = moved / layer.minimum
    full_s = full.done_s or float("nan")
    speedup = full_s / lazy.seconds
    full_ok = full.verified(layer.digest, layer.size)
    print()
    print(table(["", "bytes"], [
        ["target file's compressed chunks", f"{layer.chunk_bytes} ({layer.chunks} chunks, {len(layer.chunk_spans)} span(s))"],
        ["TOC (gzip member)", f"{layer.toc_bytes}"],
        ["footer", f"{layer.footer}"],
        ["minimum a reader needs", f"{layer.minimum} ({human_bytes(layer.minimum)})"],
        ["moved from upstream (registry log, layer)", f"{lazy.upstream_layer_bytes}"],
        ["moved from peers (agent)", f"{lazy.peer_bytes:.0f}"],
        ["agent's own count, upstream", f"{lazy.agent_upstream_bytes:.0f}"],
        ["fleetp2p get's bytes_fetched", f"{lazy.cli.get('bytes_fetched')}"],
        ["manifest bytes (not counted above)", f"{lazy.upstream_other_bytes}"],
    ]))
    print()
    print(table(["read", "seconds", "upstream bytes", "verified"], [
        ["lazy: fleetp2p get (wall, incl. start-up)", f"{lazy.seconds:.2f}",
         f"{lazy.upstream_layer_bytes}", "yes" if lazy.verified else "NO"],
        ["full: GET of the layer through the agent", f"{full_s:.2f}", f"{full_upstream}",
         "yes" if full_ok else f"NO ({full.error or full.status})"],
    ]))
    print()
    print(f"bytes moved / minimum: {bytes_ratio:.3f} (target <= {BYTES_TARGET}: "
          f"{'ok' if bytes_ratio <= BYTES_TARGET else 'MISSED'})")
    print(f"full_time / lazy_time: {speedup:.1f} (target >= {SPEEDUP_TARGET:.0f}: "
          f"{'ok' if speedup >= SPEEDUP_TARGET else 'MISSED'})")
    print(f"(the file is {source.target_size / layer.size:.2%} of the layer; fleetp2p get's own "
          f"timer, after start-up, manifest and TOC: {lazy.cli.get('seconds')} s)")
    return 0 if lazy.verified and full_ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("512MiB"),
                        help="layer size (contents are random, so compressed ~ uncompressed)")
    parser.add_argument("--link", default="100mbit", help="both hosts' link rate (tc syntax)")
    parser.add_argument("--file-size", type=parse_size, default=None,
                        help="size of the file read lazily (default 0.9%% of --size; at most 1%%)")
    parser.add_argument("--chunk-size", type=parse_size, default=None,
                        help="ctr-remote --estargz-chunk-size (default: ctr-remote's, 4MiB)")
    parser.add_argument("--compression-level", type=int, default=9,
                        help="ctr-remote --estargz-compression-level (default 9, ctr-remote's)")
    args = parser.parse_args(argv)
    args.file_size = args.file_size or int(args.size * 0.009)
    if args.file_size > args.size // 100 or args.size < 16 * MiB:
        parser.error("--file-size must be at most 1% of --size, and --size at least 16MiB")
    reason = unavailable("docker-registry", "containerd", "ctr", "ctr-remote")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    link_s = args.size * 8 / rate_bits(args.link)
    interrupt_on_sigterm()
    print_machine("times will be noisy")
    print(f"layer {human_bytes(args.size)}, file {human_bytes(args.file_size)}, link {args.link} "
          f"(layer/link = {link_s:.1f} s)", flush=True)
    try:
        with network() as net:
            net.add_host("registry", args.link, octet=2)
            client = net.add_host("client", args.link, octet=11)
            upstream = UpstreamRegistry(net["registry"], net.workdir / "registry").start()
            print("building the layer …", flush=True)
            source = build_layer(net, upstream, args)
            layer = inspect_layer(upstream, source.target)
            print(f"  eStargz layer {human_bytes(layer.size)}, TOC {human_bytes(layer.toc_bytes)} "
                  f"for {len(layer.toc.entries)} entries", flush=True)
            print("lazy read through a cold agent …", flush=True)
            lazy = lazy_read(net, upstream, client, layer, source)
            print(f"  {lazy.seconds:.2f} s", flush=True)
            print("full pull through a cold agent …", flush=True)
            full, full_upstream = full_read(net, upstream, client, layer, link_s)
            print(f"  {full.done_s or float('nan'):.1f} s", flush=True)
            return report(layer, source, lazy, full, full_upstream)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
