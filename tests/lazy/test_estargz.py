"""eStargz reader: layers made by ctr-remote, plus hand-made edge cases and corruptions."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile

import pytest

from fleetp2p.lazy import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    DigestMismatch,
    LayerFormat,
    LazyFormatError,
    NoSuchEntry,
    TocLocation,
    assemble_file,
    decode_chunk,
    detect,
    fetch_ranges,
    read_file,
)
from fleetp2p.lazy import estargz
from writers import Item, estargz_footer, sha256, write_estargz

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def open_layer(media_type: str, annotations: dict[str, str], blob: bytes) -> TOC:
    """What the agent does: plan, fetch the footer, fetch and verify the TOC."""
    plan = detect(media_type, annotations, len(blob))
    assert plan is not None and plan.format is LayerFormat.ESTARGZ
    start, end = plan.first_range(len(blob))
    location = plan.parse_footer(blob[start:end], len(blob))
    return plan.parse_toc(blob[location.offset:location.end], location)


def toc_member(doc: object, name: str = "stargz.index.json") -> bytes:
    """A TOC gzip member holding `doc` as JSON (for malformed-TOC tests)."""
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


@pytest.fixture(scope="module")
def esgz(ctr_remote_layers):
    return ctr_remote_layers["estargz"]


@pytest.fixture(scope="module")
def esgz_toc(esgz) -> TOC:
    return open_layer(esgz.media_type, esgz.annotations, esgz.blob)


# --- ctr-remote output ---------------------------------------------------------


def test_ctr_remote_layer_is_detected_and_footer_locates_toc(esgz):
    plan = detect(esgz.media_type, esgz.annotations, esgz.size)
    assert plan is not None and plan.format is LayerFormat.ESTARGZ
    assert plan.toc_digest == esgz.annotations[estargz.TOC_DIGEST_ANNOTATION]
    assert plan.uncompressed_size == int(esgz.annotations[estargz.UNCOMPRESSED_SIZE_ANNOTATION])
    assert plan.first_range(esgz.size) == (esgz.size - 51, esgz.size)
    loc = estargz.parse_footer(esgz.blob[-51:], esgz.size)
    assert loc.footer_size == 51 and loc.end == esgz.size - 51 and loc.payload_end == loc.offset
    assert esgz.blob[loc.offset:loc.offset + 2] == b"\x1f\x8b"  # the TOC starts a gzip member


def test_ctr_remote_toc_digest_is_the_annotation(esgz, esgz_toc):
    assert esgz_toc.digest == esgz.annotations[estargz.TOC_DIGEST_ANNOTATION]
    assert esgz_toc.format is LayerFormat.ESTARGZ


def test_ctr_remote_every_file_reassembles(esgz, esgz_toc, expected_files):
    for name, data in expected_files.items():
        assert assemble_file(esgz_toc, name, esgz.read) == data, name


def test_ctr_remote_chunks_verify_one_by_one(esgz, esgz_toc, expected_files):
    big = esgz_toc.file("bin/big.bin")
    assert len(big.chunks) == 6 and {c.size for c in big.chunks[:-1]} == {262144}
    for name, data in expected_files.items():
        for c in esgz_toc.file(name).chunks:
            assert c.digest is not None and c.compressed_size is not None
            piece = decode_chunk(LayerFormat.ESTARGZ, esgz.read(c.compressed_offset, c.compressed_end), c)
            assert piece == data[c.file_offset:c.file_offset + c.size]


def test_ctr_remote_entry_metadata(esgz_toc):
    assert esgz_toc.lookup("etc/link").type == "symlink"
    assert esgz_toc.lookup("etc/link").link_name == "hello.txt"
    assert esgz_toc.lookup("etc/hard", follow_hardlinks=False).type == "hardlink"
    assert esgz_toc.lookup("/etc/hard").name == "etc/hello.txt"
    assert esgz_toc.lookup("./etc/").type == "dir"
    empty = esgz_toc.file("data/empty")
    assert empty.size == 0 and empty.chunks == ()
    assert esgz_toc.file("etc/hello.txt").mode == 0o644
    with pytest.raises(NoSuchEntry):
        esgz_toc.file("etc")
    with pytest.raises(NoSuchEntry):
        esgz_toc.chunks_for("no/such/file")


def test_ctr_remote_range_read_fetches_only_the_chunks_it_needs(esgz, esgz_toc, expected_files):
    big = expected_files["bin/big.bin"]
    chunks = esgz_toc.chunks_for("bin/big.bin", 300_000, 10)
    assert [c.file_offset for c in chunks] == [262144]
    ranges = fetch_ranges(esgz_toc.chunks_for("bin/big.bin", 262_000, 300_000))
    assert len(ranges) == 1  # three adjacent chunk streams, one request

    asked: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        asked.append((start, end))
        return esgz.read(start, end)

    assert read_file(esgz_toc, "bin/big.bin", read, 262_000, 300_000) == big[262_000:562_000]
    assert all(ranges[0][0] <= s and e <= ranges[0][1] for s, e in asked)
    assert read_file(esgz_toc, "bin/big.bin", read, len(big) - 5, 100) == big[-5:]
    assert read_file(esgz_toc, "bin/big.bin", read, len(big) + 5, 10) == b""


def test_ctr_remote_marks_no_prefetch(esgz_toc):
    assert esgz_toc.landmark == NO_PREFETCH_LANDMARK
    assert esgz_toc.prefetch_range() == (0, 0)


def test_ctr_remote_prefetch_landmark_from_record(ctr_remote_layers, prioritized, expected_files):
    layer = ctr_remote_layers["estargz-prefetch"]
    toc = open_layer(layer.media_type, layer.annotations, layer.blob)
    assert toc.landmark == PREFETCH_LANDMARK
    start, end = toc.prefetch_range()
    assert start == 0 and end == toc.file(PREFETCH_LANDMARK).offset
    before = {e.name for e in toc.prefetch_entries() if e.type == "reg"}
    assert before == set(prioritized)
    for name in expected_files:
        entry = toc.file(name)  # etc/hard resolves to the prioritised etc/hello.txt
        chunks = entry.chunks
        if entry.name in prioritized:
            assert all(c.compressed_end <= end for c in chunks)
        else:
            assert all(c.compressed_offset > end for c in chunks)
        assert assemble_file(toc, name, layer.read) == expected_files[name]


# --- hand-made layers ----------------------------------------------------------

ITEMS = [
    Item("app/", "dir"),
    Item("app/main.py", data=b"print('hi')\n" * 50),
    Item("app/lib.so", data=random.Random(7).randbytes(200_000)),
    Item("app/notes.txt", data=b"not prioritised\n" * 100),
    Item("app/empty"),
]
FILES = {i.name: i.data for i in ITEMS if i.type == "reg"}


def test_prefetch_landmark_from_own_writer():
    blob, toc_digest = write_estargz(ITEMS, chunk_size=64 << 10, prioritized=("app/main.py",))
    toc = open_layer(GZIP_LAYER, {estargz.TOC_DIGEST_ANNOTATION: toc_digest}, blob)
    assert [e.name for e in toc.prefetch_entries()] == ["app/main.py"]
    assert toc.prefetch_range() == (0, toc.file(PREFETCH_LANDMARK).offset)
    assert assemble_file(toc, PREFETCH_LANDMARK, lambda s, e: blob[s:e]) == b"\x0f"
    for name, data in FILES.items():
        assert assemble_file(toc, name, lambda s, e: blob[s:e]) == data


def test_legacy_47_byte_footer():
    blob, toc_digest = write_estargz(ITEMS, legacy_footer=True)
    loc = estargz.parse_footer(blob[-51:], len(blob))
    assert loc.footer_size == 47 and loc.end == len(blob) - 47
    assert estargz.parse_footer(blob[-47:], len(blob)) == loc  # a short tail suffices
    toc = estargz.parse_toc(blob[loc.offset:loc.end], toc_digest, loc)
    for name, data in FILES.items():
        assert assemble_file(toc, name, lambda s, e: blob[s:e]) == data


def test_shared_streams_use_inner_offsets():
    blob, toc_digest = write_estargz(ITEMS, chunk_size=64 << 10, min_chunk_size=1 << 20)
    toc = open_layer(GZIP_LAYER, {estargz.TOC_DIGEST_ANNOTATION: toc_digest}, blob)
    chunks = [c for e in toc.entries for c in e.chunks]
    assert any(c.inner_offset > 0 for c in chunks)
    assert len({c.compressed_offset for c in chunks}) < len(chunks)
    assert len(fetch_ranges(chunks)) == 1
    for name, data in FILES.items():
        assert assemble_file(toc, name, lambda s, e: blob[s:e]) == data
        for c in toc.file(name).chunks:
            piece = decode_chunk(LayerFormat.ESTARGZ, blob[c.compressed_offset:c.compressed_end], c)
            assert piece == data[c.file_offset:c.file_offset + c.size]


def test_without_location_the_last_chunk_end_is_unknown():
    blob, _ = write_estargz(ITEMS)
    loc = estargz.parse_footer(blob[-51:], len(blob))
    toc = estargz.parse_toc(blob[loc.offset:loc.end], None)
    assert toc.file("app/lib.so").chunks[0].compressed_size is not None
    last = toc.file("app/notes.txt").chunks[-1]
    assert last.compressed_size is None
    with pytest.raises(LazyFormatError, match="unknown"):
        fetch_ranges([last])


# --- corruption and malformed input --------------------------------------------


def test_corrupted_chunk_is_rejected(esgz, esgz_toc):
    c = esgz_toc.file("bin/big.bin").chunks[2]
    data = bytearray(esgz.read(c.compressed_offset, c.compressed_end))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(LazyFormatError):
        decode_chunk(LayerFormat.ESTARGZ, bytes(data), c)


def test_substituted_chunk_is_a_digest_mismatch(esgz, esgz_toc, expected_files):
    c = esgz_toc.file("bin/big.bin").chunks[1]
    forged = gzip.compress(bytes(c.size))  # well-formed gzip, same size, wrong bytes
    with pytest.raises(DigestMismatch):
        decode_chunk(LayerFormat.ESTARGZ, forged, c)

    def read(start: int, end: int) -> bytes:
        return forged if start == c.compressed_offset else esgz.read(start, end)

    with pytest.raises(DigestMismatch):
        assemble_file(esgz_toc, "bin/big.bin", read)


def test_file_digest_is_checked_when_chunks_have_none():
    data = b"abc" * 1000
    member = gzip.compress(data)
    entries = [{"name": "f", "type": "reg", "size": len(data), "offset": 10, "chunkSize": 1000,
                "digest": sha256(b"not it")},
               {"name": "f", "type": "chunk", "offset": 10 + len(member), "chunkOffset": 1000}]
    blob = bytes(10) + member + gzip.compress(data[1000:])
    end = TocLocation(offset=len(blob), length=None, payload_end=len(blob))
    toc = estargz.parse_toc(toc_member({"version": 1, "entries": entries}), None, end)
    with pytest.raises(LazyFormatError, match="no digest"):
        read_file(toc, "f", lambda s, e: blob[s:e], 0, 10)
    with pytest.raises(DigestMismatch):
        assemble_file(toc, "f", lambda s, e: blob[s:e])


def test_wrong_toc_digest(esgz):
    loc = estargz.parse_footer(esgz.blob[-51:], esgz.size)
    with pytest.raises(DigestMismatch):
        estargz.parse_toc(esgz.read(loc.offset, loc.end), sha256(b"something else"), loc)
    with pytest.raises(LazyFormatError):
        estargz.parse_toc(esgz.read(loc.offset, loc.end), "md5:abc", loc)


def test_truncated_footer(esgz):
    with pytest.raises(LazyFormatError):
        estargz.parse_footer(esgz.blob[-51:-1], esgz.size - 1)
    with pytest.raises(LazyFormatError):
        estargz.parse_footer(esgz.blob[-30:], esgz.size)
    with pytest.raises(LazyFormatError):
        estargz.parse_footer(b"", 0)


@pytest.mark.parametrize("mutate", [
    lambda f: f.replace(b"STARGZ", b"STARGX"),
    lambda f: f.replace(b"SG", b"GS", 1),
    lambda f: b"\x1f\x8c" + f[2:],
    lambda f: f[:16] + b"zz" + f[18:],
    lambda f: f[:-8] + b"\x01" + f[-7:],  # the footer must be a valid empty member
])
def test_bad_footer_magic(mutate):
    footer = estargz_footer(1234)
    estargz.parse_footer(footer, 5000)
    with pytest.raises(LazyFormatError):
        estargz.parse_footer(mutate(footer), 5000)


def test_footer_offset_past_the_blob():
    with pytest.raises(LazyFormatError, match="past"):
        estargz.parse_footer(estargz_footer(10_000), 5000)


def test_external_toc_is_refused():
    extra = b"SG" + (17).to_bytes(2, "little") + b"STARGZEXTERNALTOC"
    footer = b"\x1f\x8b\x08\x04" + bytes(5) + b"\xff" + len(extra).to_bytes(2, "little") + extra
    footer += b"\x01\x00\x00\xff\xff" + bytes(8)
    with pytest.raises(LazyFormatError, match="external"):
        estargz.parse_footer(footer, 5000)


@pytest.mark.parametrize("toc_bytes, message", [
    (b"not gzip at all", "corrupt"),
    (gzip.compress(b"not a tar"), "tar"),
    (toc_member({"version": 1, "entries": []}, name="other.json"), "stargz.index.json"),
    (toc_member(b"{not json"), "JSON"),
    (toc_member(b"[" * 100_000), "JSON"),
    (toc_member({"version": 2, "entries": []}), "version"),
    (toc_member({"version": 1, "entries": {}}), "entries"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "socket"}]}), "type"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "chunk", "offset": 5}]}), "preceding"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "reg", "size": "5"}]}), "integer"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "reg", "size": -5}]}), "integer"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "reg", "size": 5}]}), "offset"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "reg", "size": 5, "offset": 9,
                                            "chunkSize": 3}]}), "cover"),
    (toc_member({"version": 1, "entries": [{"name": "a", "type": "reg", "size": 5, "offset": 9,
                                            "digest": "sha256:xyz"}]}), "digest"),
    (toc_member({"version": 1, "entries": [{"name": 5, "type": "dir"}]}), "string"),
])
def test_malformed_toc(toc_bytes, message):
    with pytest.raises(LazyFormatError, match=message):
        estargz.parse_toc(toc_bytes, None)


def test_chunk_past_the_payload_is_refused():
    doc = {"version": 1, "entries": [{"name": "a", "type": "reg", "size": 5, "offset": 900}]}
    loc = estargz.parse_footer(estargz_footer(500), 600)
    with pytest.raises(LazyFormatError, match="past"):
        estargz.parse_toc(toc_member(doc), None, loc)


def test_random_damage_only_ever_raises_lazy_format_error(esgz):
    """Fail closed: flipped bytes in the footer or TOC give a LazyFormatError or a verified TOC."""
    rnd = random.Random(99)
    loc = estargz.parse_footer(esgz.blob[-51:], esgz.size)
    tail = esgz.blob[loc.offset:]
    for _ in range(300):
        damaged = bytearray(tail)
        for _ in range(rnd.randint(1, 4)):
            damaged[rnd.randrange(len(damaged))] ^= 1 << rnd.randrange(8)
        blob_size = loc.offset + len(damaged)
        try:
            where = estargz.parse_footer(bytes(damaged[-51:]), blob_size)
            toc_bytes = bytes(damaged[where.offset - loc.offset:len(damaged) - where.footer_size])
            estargz.parse_toc(toc_bytes, esgz.annotations[estargz.TOC_DIGEST_ANNOTATION], where)
        except LazyFormatError:
            pass


def test_detect_needs_the_toc_digest_annotation():
    assert detect(GZIP_LAYER, {}) is None
    assert detect(GZIP_LAYER, None) is None
    assert detect("application/vnd.oci.image.layer.v1.tar", {estargz.TOC_DIGEST_ANNOTATION: sha256(b"")}) is None
    plan = detect("application/vnd.docker.image.rootfs.diff.tar.gzip",
                  {estargz.TOC_DIGEST_ANNOTATION: sha256(b"x")})
    assert plan is not None and plan.format is LayerFormat.ESTARGZ and plan.location is None
    with pytest.raises(LazyFormatError):
        detect(GZIP_LAYER, {estargz.TOC_DIGEST_ANNOTATION: "sha256:nothex"})
    with pytest.raises(LazyFormatError):
        detect(GZIP_LAYER, {estargz.TOC_DIGEST_ANNOTATION: sha256(b""),
                            estargz.UNCOMPRESSED_SIZE_ANNOTATION: "12\n"})
