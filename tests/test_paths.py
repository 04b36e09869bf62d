"""Local or bucket paths (``audiodiff_jax/core/paths.py``): telling them apart, writing a file whole."""

import os
import pathlib

import pytest

from audiodiff_jax.core import paths


def test_is_remote():
    assert paths.is_remote("gs://bucket/runs/x")
    assert paths.is_remote("s3://bucket/key")
    assert not paths.is_remote("/tmp/runs/x")
    assert not paths.is_remote("runs/gs:/x")  # a local name with a colon is not a URL
    assert not paths.is_remote(pathlib.Path("/tmp/x"))


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "card.json"
    paths.atomic_write(str(path), b"old")
    paths.atomic_write(path, b"new\n")  # a PathLike too
    assert path.read_bytes() == b"new\n"
    assert os.listdir(tmp_path) == ["card.json"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "card.json"
    path.write_bytes(b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paths.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        paths.atomic_write(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["card.json"]


def test_atomic_write_to_a_bucket_is_one_upload(monkeypatch):
    uploads = []

    class FakePath:
        def __init__(self, path):
            self.path = path

        def write_bytes(self, data):
            uploads.append((self.path, data))

    monkeypatch.setattr(paths.epath, "Path", FakePath)
    monkeypatch.setattr(paths.os, "replace", lambda *a: pytest.fail("a rename in a bucket is a copy"))
    paths.atomic_write("gs://bucket/run/goodput.json", b"{}")
    assert uploads == [("gs://bucket/run/goodput.json", b"{}")]
