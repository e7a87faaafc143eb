"""Output files: direct I/O (aligned buffers, background writes, an unaligned tail written
through the page cache) writes exactly the bytes the page-cache path writes, and is given
up where the file system refuses it."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from moekit.direct_io import BLOCK, BufferedFile, DirectFile, open_output


def _write_pieces(out, source_fd: int) -> None:
    """A header-like prefix, writes crossing buffer boundaries, and ranges of a file."""
    out.write(memoryview(b"\x07" * 13))
    out.write(memoryview(bytes(range(256)) * 70))
    out.write_from(source_fd, 5, 3 * BLOCK + 11)
    out.write(memoryview(b""))
    out.write_from(source_fd, 0, 1)
    out.write(memoryview(b"tail" * 999))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(5 * BLOCK))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture
def expected(tmp_path, source) -> bytes:
    """What the page-cache path writes."""
    buffered = BufferedFile(tmp_path / "buffered")
    _write_pieces(buffered, source)
    buffered.close()
    return (tmp_path / "buffered").read_bytes()


@pytest.fixture
def direct(tmp_path) -> DirectFile:
    """A direct-I/O file with small buffers, so that the pieces cross several of them."""
    try:
        return DirectFile(tmp_path / "direct", buffer_bytes=2 * BLOCK)
    except OSError as err:
        pytest.skip(f"this file system refuses direct I/O ({err})")


def test_direct_writes_the_bytes_buffered_writes(tmp_path, source, expected, direct):
    _write_pieces(direct, source)
    direct.close()
    assert len(expected) % BLOCK, "the tail must be a partial block to test its write"
    assert (tmp_path / "direct").read_bytes() == expected


def test_direct_writes_refused_after_open_fall_back_to_buffered(tmp_path, source, expected,
                                                               direct, monkeypatch):
    real_pwrite = os.pwrite

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    _write_pieces(direct, source)
    direct.close()
    assert (tmp_path / "direct").read_bytes() == expected


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    out = open_output(tmp_path / "out", direct=True)
    out.write(memoryview(b"abc"))
    out.close()
    assert isinstance(out, BufferedFile) and (tmp_path / "out").read_bytes() == b"abc"
