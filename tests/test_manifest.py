"""Checkpoints are verified: a manifest of sizes and SHA-256 digests, written last; a damaged file is
named, whether it is cut short, padded, has one flipped bit, or is gone. The reference digest is
hashlib's SHA-256 of each CHUNK_BYTES piece, computed here from the bytes on disk."""
import hashlib
import json

import pytest

from cir import manifest
from cir.errors import UserError


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "sub" / "b.txt").write_text("hello\n")
    (tmp_path / "empty").write_bytes(b"")
    manifest.write(tmp_path, manifest.digest_files(tmp_path, manifest.list_files(tmp_path)))
    return tmp_path


def test_entries_are_sizes_and_sha256_of_each_piece(tree, monkeypatch):
    files = json.loads((tree / manifest.MANIFEST).read_text())["files"]
    assert sorted(files) == ["a.bin", "empty", "sub/b.txt"]
    for name, entry in files.items():
        data = (tree / name).read_bytes()
        assert entry == {"size": len(data), "sha256": [hashlib.sha256(data).hexdigest()]}
    # a file longer than a piece: one digest per piece, hashed by several threads
    monkeypatch.setattr(manifest, "CHUNK_BYTES", 1000)
    data = (tree / "a.bin").read_bytes()
    entry = manifest.digest_files(tree, ["a.bin"], threads=3)["a.bin"]
    assert entry["sha256"] == [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in range(0, len(data), 1000)]


def test_a_whole_tree_verifies_and_no_manifest_is_nothing_to_check(tree, tmp_path_factory):
    assert manifest.verify(tree) is True
    assert manifest.verify(tmp_path_factory.mktemp("plain")) is False


@pytest.mark.parametrize("damage, what", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "10239 bytes, the manifest says 10240"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "10241 bytes, the manifest says 10240"),
    (lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]), "content differs"),
    (lambda p: p.unlink(), "missing"),
])
def test_a_damaged_file_is_named(tree, damage, what):
    damage(tree / "a.bin")
    with pytest.raises(UserError, match=f"damaged file {tree / 'a.bin'}: {what}") as info:
        manifest.verify(tree)
    assert info.value.file == str(tree / "a.bin") and "\n" not in str(info.value)


def test_a_damaged_manifest_is_named(tree):
    (tree / manifest.MANIFEST).write_text('{"format": "cir-manifest-1", "files": ')
    with pytest.raises(UserError, match=f"damaged manifest {tree / manifest.MANIFEST}"):
        manifest.verify(tree)


def test_share_splits_the_bytes_evenly_and_the_same_way_everywhere():
    entries = {f"f{i}": {"size": size} for i, size in enumerate([90, 50, 40, 30, 20, 10, 10])}
    parts = manifest.share(entries, 3)
    assert sorted(n for part in parts for n in part) == sorted(entries)
    loads = sorted(sum(entries[n]["size"] for n in part) for part in parts)
    assert loads == [80, 80, 90]
    assert manifest.share(dict(reversed(entries.items())), 3) == parts
