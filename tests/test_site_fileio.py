"""write_atomic: whole files only, and an unchanged file keeps its bytes and its mtime."""

import os

from explainer.fileio import write_atomic


def test_a_new_or_changed_file_is_replaced_whole_with_the_usual_permissions(tmp_path):
    path = tmp_path / "_posts" / "zh" / "post-zh.md"
    assert write_atomic(path, "第一版\n") is True  # parent folders are made
    assert path.read_text(encoding="utf-8") == "第一版\n"
    assert write_atomic(path, b"second\n") is True
    assert path.read_bytes() == b"second\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(path.parent) == ["post-zh.md"]  # no temp file left behind


def test_the_same_bytes_are_not_written_again(tmp_path):
    path = tmp_path / "post.md"
    write_atomic(path, "same\n")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an mtime a rewrite could not keep
    assert write_atomic(path, "same\n") is False
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert write_atomic(path, "changed\n") is True
    assert path.stat().st_mtime_ns != 1_000_000_000
