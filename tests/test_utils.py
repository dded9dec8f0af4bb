"""Atomic writes and output-path containment."""

from __future__ import annotations

import pytest

from medpretrain.utils import atomic_path, atomic_write_text, hash_files, resolve_inside


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp files left behind
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_resolve_inside_refuses_escapes(tmp_path):
    assert resolve_inside(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="escapes the output directory"):
            resolve_inside(tmp_path, bad)


def test_hash_files_depends_on_content_not_order(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    h = hash_files([a, b])
    assert h == hash_files([b, a]) and len(h) == 16
    b.write_bytes(b"3")
    assert hash_files([a, b]) != h
