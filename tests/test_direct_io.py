"""Output files: direct I/O (page-aligned staging buffers, the partial blocks between them
carried over, an unaligned tail written through the page cache) writes exactly the bytes
the page-cache path writes, and is given up where the file system refuses it; kernel
copies are replaced by reads and writes where the kernel refuses them (a real other file
system: test_output_safety)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import pytest

from moekit.direct_io import BLOCK, BufferedFile, StagedFile
from moekit.errors import MoekitError


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


CUTS = (13, 200, 1, 2 * BLOCK, 3 * BLOCK + 11, 0, 5)
"""Sizes of the staged writes (the rest is one more): starts and ends off and on blocks."""


def _write_staged(out: StagedFile, data: bytes) -> None:
    """``data`` handed to ``out`` in pieces of CUTS, each in a fresh page-aligned buffer."""
    start = 0
    for size in (*CUTS, len(data) - sum(CUTS)):
        lead = StagedFile.lead(start)
        buffer = mmap.mmap(-1, lead + size + BLOCK)
        buffer[lead:lead + size] = data[start:start + size]
        out.write(memoryview(buffer), start, size)
        start += size
    out.close()


@pytest.fixture
def direct(tmp_path) -> StagedFile:
    out = StagedFile(tmp_path / "direct")
    if not fcntl.fcntl(out._fd, fcntl.F_GETFL) & os.O_DIRECT:
        out.discard()
        pytest.skip("this file system refuses direct I/O")
    return out


def test_direct_writes_the_bytes_buffered_writes(tmp_path, expected, direct):
    assert len(expected) % BLOCK, "the tail must be a partial block to test its write"
    _write_staged(direct, expected)
    assert (tmp_path / "direct").read_bytes() == expected


def test_direct_writes_refused_after_open_fall_back_to_buffered(tmp_path, expected, direct,
                                                               monkeypatch):
    real_pwrite = os.pwrite

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    _write_staged(direct, expected)
    assert (tmp_path / "direct").read_bytes() == expected


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, expected, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    _write_staged(StagedFile(tmp_path / "out"), expected)
    assert (tmp_path / "out").read_bytes() == expected


def test_staged_writes_out_of_order_are_refused(tmp_path):
    out = StagedFile(tmp_path / "out")
    buffer = mmap.mmap(-1, 2 * BLOCK)
    out.write(memoryview(buffer), 0, 10)
    with pytest.raises(ValueError, match="bytes from 20 handed over where 10 comes next"):
        out.write(memoryview(buffer), 20, 10)
    out.discard()


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_ranges_the_kernel_will_not_copy_are_read_and_written(tmp_path, source, expected,
                                                              monkeypatch, code):
    """EXDEV: another file system; the others: a file system without copy_file_range. The
    first refusal comes after part of a range was copied, and is not asked again."""
    real_copy = os.copy_file_range
    calls = []

    def copy_once_then_refuse(src, dst, count, offset_src, offset_dst):
        calls.append(count)
        if len(calls) == 1:
            return real_copy(src, dst, min(count, 100), offset_src, offset_dst)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", copy_once_then_refuse)
    out = BufferedFile(tmp_path / "out")
    _write_pieces(out, source)
    out.close()
    assert (tmp_path / "out").read_bytes() == expected and len(calls) == 2


def test_a_kernel_copy_error_a_plain_write_would_meet_too_is_raised(tmp_path, source,
                                                                   monkeypatch):
    def refuse(*args):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = BufferedFile(tmp_path / "out")
    with pytest.raises(PermissionError):
        out.write_from(source, 0, BLOCK)
    out.close()


def test_a_source_shorter_than_its_header_says_is_an_error(tmp_path, source):
    out = BufferedFile(tmp_path / "out")
    with pytest.raises(MoekitError, match="ended 4096 bytes before"):
        out.write_from(source, 4 * BLOCK, 2 * BLOCK)
    out.close()


def test_shard_writer_copies_ranges_that_continue_one_another_in_one_call(tmp_path, source,
                                                                          monkeypatch):
    """Tensors whose bytes follow one another in a source file are copied by one
    ``write_from``; a gap, another file or a built tensor starts a new copy. The bytes are
    those of copying each range alone."""
    import torch
    from safetensors import safe_open

    from moekit.safetensors_writer import ShardWriter

    calls: list[tuple[int, int, int]] = []
    write_from = BufferedFile.write_from

    def record(self, fd, offset, size):
        calls.append((fd, offset, size))
        write_from(self, fd, offset, size)

    monkeypatch.setattr(BufferedFile, "write_from", record)
    other = os.open(tmp_path / "other.bin", os.O_RDWR | os.O_CREAT)
    os.write(other, os.urandom(BLOCK))
    entries = [(name, "U8", (size,)) for name, size in
               [("a", 100), ("b", 28), ("c", 72), ("d", 50), ("e", 10), ("f", 6)]]
    with ShardWriter(tmp_path / "out.safetensors", entries, {}) as writer:
        writer.copy_ranges("a", [(source, 0, 100)])
        writer.copy_ranges("b", [(source, 100, 20), (source, 120, 8)])
        writer.copy_ranges("c", [(source, 128, 72)])
        writer.copy_ranges("d", [(source, 300, 50)])  # a gap
        writer.copy_ranges("e", [(other, 350, 10)])  # another file at the next offset
        writer.write("f", torch.arange(6, dtype=torch.uint8))
    os.close(other)
    assert calls == [(source, 0, 200), (source, 300, 50), (other, 350, 10)]
    data = os.pread(source, 5 * BLOCK, 0)
    expected = {"a": data[:100], "b": data[100:128], "c": data[128:200],
                "d": data[300:350], "e": (tmp_path / "other.bin").read_bytes()[350:360],
                "f": bytes(range(6))}
    with safe_open(tmp_path / "out.safetensors", "pt") as written:
        assert {k: written.get_tensor(k).numpy().tobytes() for k in expected} == expected


def test_kernel_copies_start_the_disk_writes_as_they_go(tmp_path, source, expected,
                                                        monkeypatch):
    """Every WRITEBACK_BYTES copied, writeback of the bytes since the last start is asked
    for (the ranges follow one another from the file's start); the bytes are unchanged."""
    import moekit.direct_io as direct_io

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(direct_io, "WRITEBACK_BYTES", BLOCK)
    monkeypatch.setattr(direct_io, "_sync_file_range",
                        lambda: lambda fd, offset, size, flags: started.append(
                            (offset.value, size.value)))
    out = BufferedFile(tmp_path / "out")
    _write_pieces(out, source)
    out.close()
    assert (tmp_path / "out").read_bytes() == expected
    assert started and started[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:]))
    assert all(n >= BLOCK for _, n in started)
