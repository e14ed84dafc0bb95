"""The one atomic-write helper: a failed write leaves the old file and no temporary."""

from __future__ import annotations

import stat

import pytest

from tga.atomic import atomic_write, atomic_write_many, atomic_write_text, no_empty_folders_left, stale_temporaries


def test_atomic_write_replaces_and_sets_readable_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert stale_temporaries(target) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and stale_temporaries(target) == []


def test_write_many_renames_nothing_until_every_file_is_written(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.json"

    with pytest.raises(TypeError):
        atomic_write_many({a: b"complete", b: None})  # the second cannot be written
    assert not a.exists() and not b.exists()
    assert stale_temporaries(a) == [] and stale_temporaries(b) == []
    atomic_write_many({a: b"1", b: b"2"})
    assert (a.read_bytes(), b.read_bytes()) == (b"1", b"2")


def test_a_failed_step_leaves_no_empty_folders_it_made(tmp_path):
    run = tmp_path / "a" / "run"
    with pytest.raises(RuntimeError):
        with no_empty_folders_left(run):
            (run / "checkpoints").mkdir(parents=True)
            raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with no_empty_folders_left(run):
            (run / "checkpoints").mkdir(parents=True)
            (run / "log.csv").write_text("kept\n")
            raise RuntimeError("failed after writing a file")
    assert (run / "log.csv").is_file() and not (run / "checkpoints").exists()
    with no_empty_folders_left(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()  # success keeps everything

