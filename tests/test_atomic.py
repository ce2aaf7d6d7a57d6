from __future__ import annotations

import pytest

from shards.common.atomic import atomic_path, atomic_write_text


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.csv"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_success_replaces_and_is_readable(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o444) == 0o444
