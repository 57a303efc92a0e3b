"""zstd:chunked reader: layers made by skopeo and ctr-remote, hand-made footers, corruptions."""

from __future__ import annotations

import json
import random
import struct

import pytest
import zstandard

from fleetp2p.lazy import (
    NO_PREFETCH_LANDMARK,
    TOC,
    DigestMismatch,
    LayerFormat,
    LazyFormatError,
    assemble_file,
    decode_chunk,
    detect,
    fetch_ranges,
    read_file,
)
from fleetp2p.lazy import zstdchunked
from writers import Item, sha256, write_zstd_chunked

ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


def open_layer(media_type: str, annotations: dict[str, str], blob: bytes) -> TOC:
    """What the agent does: plan, fetch the TOC (located by annotation or footer), verify it."""
    plan = detect(media_type, annotations, len(blob))
    assert plan is not None and plan.format is LayerFormat.ZSTD_CHUNKED
    location = plan.location
    if location is None:
        start, end = plan.first_range(len(blob))
        location = plan.parse_footer(blob[start:end], len(blob))
    return plan.parse_toc(blob[location.offset:location.end], location)


@pytest.fixture(scope="module")
def skopeo_toc(skopeo_zstd_layer) -> TOC:
    layer = skopeo_zstd_layer
    return open_layer(layer.media_type, layer.annotations, layer.blob)


# --- skopeo output -------------------------------------------------------------


def test_skopeo_annotations_locate_the_toc(skopeo_zstd_layer):
    layer = skopeo_zstd_layer
    assert layer.media_type == ZSTD_LAYER
    plan = detect(layer.media_type, layer.annotations, layer.size)
    assert plan is not None and plan.location is not None
    # skopeo 1.9 writes the older io.containers.* dialect.
    assert plan.toc_digest == zstdchunked.checksum_from_annotations(layer.annotations)
    offset, length, ulength, mtype = map(int, [v for k, v in layer.annotations.items()
                                              if k.endswith("manifest-position")][0].split(":"))
    assert plan.first_range(layer.size) == (offset, offset + length)
    assert layer.blob[offset - 8:offset - 4] == zstdchunked.SKIPPABLE_MAGIC
    from_footer = zstdchunked.parse_footer(layer.blob[-zstdchunked.FOOTER_FETCH_SIZE:], layer.size)
    assert (from_footer.offset, from_footer.length, from_footer.uncompressed_length) == (offset, length, ulength)
    assert from_footer.payload_end == plan.location.payload_end == offset - 8
    assert from_footer.footer_size in (48, 72)


def test_skopeo_toc_checksum_is_over_the_compressed_manifest(skopeo_zstd_layer, skopeo_toc):
    layer = skopeo_zstd_layer
    loc = zstdchunked.location_from_annotations(layer.annotations)
    assert skopeo_toc.digest == sha256(layer.blob[loc.offset:loc.end])
    assert skopeo_toc.digest == zstdchunked.checksum_from_annotations(layer.annotations)


def test_skopeo_every_file_reassembles(skopeo_zstd_layer, skopeo_toc, expected_files):
    for name, data in expected_files.items():
        assert assemble_file(skopeo_toc, name, skopeo_zstd_layer.read) == data, name


def test_skopeo_chunks_verify_one_by_one(skopeo_zstd_layer, skopeo_toc, expected_files):
    layer = skopeo_zstd_layer
    big = skopeo_toc.file("bin/big.bin")
    assert len(big.chunks) > 3  # content-defined chunking split it
    for name, data in expected_files.items():
        for c in skopeo_toc.file(name).chunks:
            assert c.digest is not None
            piece = decode_chunk(LayerFormat.ZSTD_CHUNKED, layer.read(c.compressed_offset, c.compressed_end), c)
            assert piece == data[c.file_offset:c.file_offset + c.size]
    # A chunk's frames end where the next chunk's start; the last ends at the file's endOffset.
    for a, b in zip(big.chunks, big.chunks[1:]):
        assert a.compressed_end == b.compressed_offset


def test_skopeo_zeros_chunk_is_rebuilt_without_fetching(skopeo_zstd_layer, skopeo_toc, expected_files):
    sparse = skopeo_toc.file("data/sparse.bin")
    holes = [c for c in sparse.chunks if c.zeros]
    assert holes and all(c.size >= 1024 for c in holes)
    asked: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        asked.append((start, end))
        return skopeo_zstd_layer.read(start, end)

    assert assemble_file(skopeo_toc, "data/sparse.bin", read) == expected_files["data/sparse.bin"]
    assert all((c.compressed_offset, c.compressed_end) not in asked for c in holes)
    hole = holes[0]
    assert decode_chunk(LayerFormat.ZSTD_CHUNKED, b"", hole) == bytes(hole.size)  # digest still checked
    assert all(r[0] != hole.compressed_offset for r in fetch_ranges(sparse.chunks))


def test_skopeo_entry_metadata(skopeo_toc):
    assert skopeo_toc.lookup("etc/link").link_name == "hello.txt"
    assert skopeo_toc.lookup("etc/hard", follow_hardlinks=False).link_name == "etc/hello.txt"
    assert skopeo_toc.lookup("etc").type == "dir"
    assert skopeo_toc.file("data/empty").chunks == ()
    assert skopeo_toc.landmark is None and skopeo_toc.prefetch_range() is None


def test_skopeo_range_read(skopeo_zstd_layer, skopeo_toc, expected_files):
    big = expected_files["bin/big.bin"]
    chunks = skopeo_toc.chunks_for("bin/big.bin", 700_000, 1000)
    assert 1 <= len(chunks) <= 2
    assert read_file(skopeo_toc, "bin/big.bin", skopeo_zstd_layer.read, 700_000, 1000) == big[700_000:701_000]
    spread = skopeo_toc.file("bin/big.bin").chunks[::3]  # non-adjacent chunks
    assert len(fetch_ranges(spread)) == len(spread)
    assert len(fetch_ranges(spread, gap=1 << 30)) == 1


# --- ctr-remote's zstd:chunked (eStargz-style TOC in a zstd:chunked container) --


def test_ctr_remote_zstdchunked(ctr_remote_layers, expected_files):
    layer = ctr_remote_layers["zstdchunked"]
    plan = detect(layer.media_type, layer.annotations, layer.size)
    assert plan.toc_digest is not None and plan.toc_json_digest is not None
    toc = open_layer(layer.media_type, layer.annotations, layer.blob)
    assert toc.landmark == NO_PREFETCH_LANDMARK
    for name, data in expected_files.items():
        assert assemble_file(toc, name, layer.read) == data, name
    footer_loc = zstdchunked.parse_footer(layer.blob[-72:], layer.size)
    assert footer_loc.offset == plan.location.offset and footer_loc.footer_size == 48
    with pytest.raises(DigestMismatch):
        zstdchunked.parse_toc(layer.read(footer_loc.offset, footer_loc.end), plan.toc_digest, footer_loc,
                              expected_json_digest=sha256(b"other"))


# --- hand-made layers: the newer footer and annotation dialect -----------------

ITEMS = [
    Item("opt/", "dir"),
    Item("opt/tool", data=random.Random(3).randbytes(150_000)),
    Item("opt/holes", data=b"x" * 1000 + bytes(70_000) + b"y" * 1000),
    Item("opt/empty"),
    Item("opt/tool-link", "symlink", link="tool"),
]
FILES = {i.name: i.data for i in ITEMS if i.type == "reg"}


def test_v2_footer_and_github_dialect():
    blob, annotations = write_zstd_chunked(ITEMS, chunk_size=32 << 10)
    assert "io.github.containers.zstd-chunked.manifest-checksum" in annotations
    loc = zstdchunked.parse_footer(blob[-72:], len(blob))
    assert loc.footer_size == 72
    from_annotations = zstdchunked.location_from_annotations(annotations)
    assert (loc.offset, loc.length, loc.tar_split) == (from_annotations.offset, from_annotations.length,
                                                       from_annotations.tar_split)
    toc = open_layer(ZSTD_LAYER, annotations, blob)
    assert any(c.zeros for c in toc.file("opt/holes").chunks)
    for name, data in FILES.items():
        assert assemble_file(toc, name, lambda s, e: blob[s:e]) == data


def test_v1_footer_and_old_dialect():
    blob, annotations = write_zstd_chunked(ITEMS, footer="v1", dialect="io.containers")
    assert zstdchunked.parse_footer(blob[-72:], len(blob)).footer_size == 48
    toc = open_layer(ZSTD_LAYER, {k: v for k, v in annotations.items() if "checksum" in k}, blob)
    for name, data in FILES.items():
        assert assemble_file(toc, name, lambda s, e: blob[s:e]) == data


def test_transitional_56_byte_footer():
    """containers/storage 1.47-1.49 wrote the 40-byte fields padded to 56 bytes."""
    blob, _ = write_zstd_chunked(ITEMS, footer="v1")
    fields = blob[-40:] + bytes(16)
    blob = blob[:-48] + zstdchunked.SKIPPABLE_MAGIC + struct.pack("<I", 56) + fields
    loc = zstdchunked.parse_footer(blob[-72:], len(blob))
    assert loc.footer_size == 64 and zstdchunked.parse_toc(blob[loc.offset:loc.end], None, loc)


# --- corruption and malformed input --------------------------------------------


def test_corrupted_chunk_is_rejected(skopeo_zstd_layer, skopeo_toc):
    c = skopeo_toc.file("bin/big.bin").chunks[1]
    data = bytearray(skopeo_zstd_layer.read(c.compressed_offset, c.compressed_end))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(LazyFormatError):
        decode_chunk(LayerFormat.ZSTD_CHUNKED, bytes(data), c)


def test_substituted_chunk_is_a_digest_mismatch(skopeo_zstd_layer, skopeo_toc):
    c = skopeo_toc.file("bin/big.bin").chunks[1]
    forged = zstandard.ZstdCompressor().compress(bytes(c.size))
    with pytest.raises(DigestMismatch):
        decode_chunk(LayerFormat.ZSTD_CHUNKED, forged, c)
    with pytest.raises(DigestMismatch):
        assemble_file(skopeo_toc, "bin/big.bin",
                      lambda s, e: forged if s == c.compressed_offset else skopeo_zstd_layer.read(s, e))


def test_truncated_chunk_is_rejected(skopeo_zstd_layer, skopeo_toc):
    c = skopeo_toc.file("bin/big.bin").chunks[0]
    with pytest.raises(LazyFormatError, match="ended"):
        decode_chunk(LayerFormat.ZSTD_CHUNKED, skopeo_zstd_layer.read(c.compressed_offset, c.compressed_end - 9), c)


def test_wrong_toc_checksum(skopeo_zstd_layer):
    loc = zstdchunked.location_from_annotations(skopeo_zstd_layer.annotations)
    with pytest.raises(DigestMismatch):
        zstdchunked.parse_toc(skopeo_zstd_layer.read(loc.offset, loc.end), sha256(b"nope"), loc)


def test_truncated_toc(skopeo_zstd_layer):
    loc = zstdchunked.location_from_annotations(skopeo_zstd_layer.annotations)
    with pytest.raises(LazyFormatError, match="truncated"):
        zstdchunked.parse_toc(skopeo_zstd_layer.read(loc.offset, loc.end - 1), None, loc)


def test_truncated_footer(skopeo_zstd_layer):
    blob = skopeo_zstd_layer.blob
    with pytest.raises(LazyFormatError):
        zstdchunked.parse_footer(blob[-72:-1], len(blob) - 1)
    with pytest.raises(LazyFormatError):
        zstdchunked.parse_footer(blob[-20:], len(blob))


@pytest.mark.parametrize("footer", ["v1", "v2"])
def test_bad_footer_magic(footer):
    blob, _ = write_zstd_chunked(ITEMS, footer=footer)
    with pytest.raises(LazyFormatError, match="magic"):
        zstdchunked.parse_footer(blob[:-1] + b"X", len(blob))
    size = 72 if footer == "v2" else 48
    with pytest.raises(LazyFormatError):  # the skippable frame header is checked too
        zstdchunked.parse_footer(blob[:-size] + b"\x51" + blob[1 - size:], len(blob))


def test_footer_fields_are_checked():
    blob, _ = write_zstd_chunked(ITEMS)
    fields = list(struct.unpack_from("<7Q", blob, len(blob) - 64))

    def with_fields(values: list[int]) -> bytes:
        return blob[:-64] + struct.pack("<7Q", *values) + blob[-8:]

    with pytest.raises(LazyFormatError, match="type"):
        zstdchunked.parse_footer(with_fields(fields[:3] + [2] + fields[4:])[-72:], len(blob))
    with pytest.raises(LazyFormatError, match="past"):
        zstdchunked.parse_footer(with_fields([len(blob)] + fields[1:])[-72:], len(blob))
    with pytest.raises(LazyFormatError, match="maximum"):
        zstdchunked.parse_footer(with_fields(fields[:1] + [1 << 40] + fields[2:])[-72:], len(blob))


def test_annotation_checks():
    blob, annotations = write_zstd_chunked(ITEMS)
    position = annotations["io.github.containers.zstd-chunked.manifest-position"]
    for bad in ("1:2:3", "a:b:c:d", "10:20:30:2", "10:20:30:1\n", "0:0:0:1"):
        with pytest.raises(LazyFormatError):
            detect(ZSTD_LAYER, annotations | {"io.github.containers.zstd-chunked.manifest-position": bad})
    with pytest.raises(LazyFormatError, match="conflicting"):
        detect(ZSTD_LAYER, annotations | {"io.containers.zstd-chunked.manifest-position": "8:1:1:1"})
    agree = annotations | {"io.containers.zstd-chunked.manifest-position": position}
    assert detect(ZSTD_LAYER, agree, len(blob)).location.offset == int(position.split(":")[0])
    with pytest.raises(LazyFormatError, match="past the end"):
        detect(ZSTD_LAYER, annotations, 100)
    assert detect(ZSTD_LAYER, {}) is None
    assert detect("application/vnd.oci.image.layer.v1.tar+gzip", annotations) is None


def _manifest_for(entries: list[dict]) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps({"version": 1, "entries": entries}).encode())


@pytest.mark.parametrize("entries, message", [
    ([{"name": "a", "type": "reg", "size": 10, "offset": 100, "endOffset": 150, "chunkSize": 5,
       "chunkType": "holes"}], "chunk type"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 100, "endOffset": 90}], "bad end"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 100, "endOffset": 150, "chunkSize": 5},
      {"name": "a", "type": "chunk", "offset": 120, "chunkOffset": 6, "chunkSize": 4}], "tile"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 100, "endOffset": 150, "chunkSize": 5},
      {"name": "a", "type": "chunk", "offset": 90, "chunkOffset": 5, "chunkSize": 5}], "bad end"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 100, "endOffset": 9999}], "bad end"),
])
def test_malformed_toc(entries, message):
    from fleetp2p.lazy import TocLocation

    loc = TocLocation(offset=1008, length=None, payload_end=1000)
    with pytest.raises(LazyFormatError, match=message):
        zstdchunked.parse_toc(_manifest_for(entries), None, loc)


def test_garbage_manifest():
    with pytest.raises(LazyFormatError):
        zstdchunked.parse_toc(b"\x28\xb5\x2f\xfd garbage", None)
    with pytest.raises(LazyFormatError):
        zstdchunked.parse_toc(zstandard.ZstdCompressor().compress(b"\xff\xfe not json"), None)


def test_random_damage_only_ever_raises_lazy_format_error(skopeo_zstd_layer):
    """Fail closed: flipped bytes in the TOC frames or footer give a LazyFormatError or a good TOC."""
    layer = skopeo_zstd_layer
    rnd = random.Random(7)
    loc = zstdchunked.location_from_annotations(layer.annotations)
    start = loc.offset - 8
    for _ in range(300):
        damaged = bytearray(layer.blob[start:])
        for _ in range(rnd.randint(1, 4)):
            damaged[rnd.randrange(len(damaged))] ^= 1 << rnd.randrange(8)
        try:
            where = zstdchunked.parse_footer(bytes(damaged[-72:]), start + len(damaged))
            toc_bytes = bytes(damaged[where.offset - start:where.end - start])
            zstdchunked.parse_toc(toc_bytes, None, where)
        except LazyFormatError:
            pass
