"""Real layers for the format readers, made once per test session by the real tools.

- zstd:chunked: `skopeo copy --dest-compress-format zstd:chunked` between two
  OCI layout directories (no registry involved).
- eStargz (and ctr-remote's zstd:chunked flavour): a private containerd from
  the project harness (socket in a temp dir, no TCP listener, CRI disabled),
  `ctr image import --no-unpack` of the source layout as an OCI archive,
  `ctr-remote image convert`, then `ctr image export` back to an OCI archive
  that the tests read.  No registry is needed for either.

The harness stops containerd by its process group and removes its temp dir,
also when a test or the setup fails; the rest lives in pytest's tmp dirs.
"""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.containerd import Containerd, start_containerd
from harness.process import run
from writers import Item, RealLayer, build_tar, gzip_member, load_layer, sha256, write_oci_layout

_rnd = random.Random(20240601)
ITEMS = [
    Item("etc/", "dir"),
    Item("etc/hello.txt", data=b"hello world\n"),
    Item("bin/", "dir"),
    Item("bin/big.bin", data=_rnd.randbytes(1_500_000)),
    Item("data/", "dir"),
    Item("data/sparse.bin", data=_rnd.randbytes(70_000) + bytes(200_000) + _rnd.randbytes(50_000)),
    Item("data/zeros.bin", data=bytes(300_000)),
    Item("data/empty"),
    Item("data/text.txt", data=b"".join(b"line %06d of a compressible file\n" % i for i in range(6000))),
    Item("etc/link", "symlink", link="hello.txt"),
    Item("etc/hard", "hardlink", link="etc/hello.txt"),
]
# What every reader must give back for each regular file (hardlinks included).
EXPECTED_FILES = {i.name: i.data for i in ITEMS if i.type == "reg"} | {"etc/hard": b"hello world\n"}
PRIORITIZED = ("etc/hello.txt", "data/text.txt")
CTR_NAMESPACE = "fleetp2p-lazy"
SOURCE_REF = "example.test/lazy"


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: skopeo, containerd, stargz-snapshotter)")


@pytest.fixture(scope="session")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout holding one image whose only layer is a plain tar+gzip of ITEMS."""
    root = tmp_path_factory.mktemp("src-layout")
    raw = build_tar(ITEMS)
    write_oci_layout(root, "v1", gzip_member(raw), "application/vnd.oci.image.layer.v1.tar+gzip", sha256(raw))
    return root


@pytest.fixture(scope="session")
def skopeo_zstd_layer(source_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> RealLayer:
    _need("skopeo")
    dest = tmp_path_factory.mktemp("skopeo-zstd") / "layout"
    run(["skopeo", "copy", "--quiet", "--dest-compress-format", "zstd:chunked",
         f"oci:{source_layout}:v1", f"oci:{dest}:v1"], timeout=120)
    return load_layer(dest, "v1")


@pytest.fixture(scope="session")
def lazy_containerd() -> Iterator[Containerd]:
    """One private containerd for the session's conversions (the project harness starts it)."""
    _need("containerd", "ctr", "ctr-remote")
    with start_containerd(snapshotter="native") as ctrd:
        yield ctrd


@pytest.fixture(scope="session")
def ctr_remote_layers(lazy_containerd: Containerd, source_layout: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, RealLayer]:
    """Layers converted by ctr-remote: 'estargz', 'estargz-prefetch', 'zstdchunked'."""
    work = tmp_path_factory.mktemp("ctr-remote")
    archive = work / "source.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(source_layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source_layout)), recursive=False)
    record = work / "record.json"
    record.write_text("".join(json.dumps({"path": "/" + p}) + "\n" for p in PRIORITIZED))

    def ctr(tool: str, *args: str) -> None:
        run([tool, "-a", str(lazy_containerd.socket), "-n", CTR_NAMESPACE, *args], timeout=120)

    ctr("ctr", "image", "import", "--no-unpack", "--base-name", SOURCE_REF, str(archive))
    src = f"{SOURCE_REF}:v1"
    # A chunk size well below big.bin's size, so files really are split.
    ctr("ctr-remote", "image", "convert", "--oci", "--estargz", "--estargz-chunk-size", "262144",
        src, f"{SOURCE_REF}:estargz")
    ctr("ctr-remote", "image", "convert", "--oci", "--estargz", "--estargz-record-in", str(record),
        src, f"{SOURCE_REF}:estargz-prefetch")
    ctr("ctr-remote", "image", "convert", "--oci", "--zstdchunked", src, f"{SOURCE_REF}:zstdchunked")
    names = ("estargz", "estargz-prefetch", "zstdchunked")
    out = work / "converted.tar"
    ctr("ctr", "image", "export", "--skip-manifest-json", str(out), *(f"{SOURCE_REF}:{n}" for n in names))
    layout = work / "converted"
    with tarfile.open(out) as tar:
        tar.extractall(layout, filter="data")
    return {n: load_layer(layout, n) for n in names}


@pytest.fixture(scope="session")
def expected_files() -> dict[str, bytes]:
    """Regular file name -> content every reader must give back (hardlinks included)."""
    return dict(EXPECTED_FILES)


@pytest.fixture(scope="session")
def layer_items() -> list[Item]:
    return list(ITEMS)


@pytest.fixture(scope="session")
def prioritized() -> tuple[str, ...]:
    """Files recorded as accessed for `ctr-remote convert --estargz-record-in`."""
    return PRIORITIZED
