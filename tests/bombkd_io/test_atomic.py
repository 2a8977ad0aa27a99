"""atomic_path: the one way bombkd writes a finished file (temp beside it, fsync, rename)."""
from __future__ import annotations

import threading

import pytest

from bombkd_io.atomic import atomic_path, commit, discard, remove_temps, temp_path, temp_target


def test_writes_through_a_temp_name_and_replaces(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old")
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp.name.startswith(".")
        tmp.write_text("new")
        assert out.read_text() == "old"                 # nothing visible before the rename
    assert out.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_error_leaves_the_old_file_and_no_temp(tmp_path):
    out = tmp_path / "sheet.png"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("half way")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["sheet.png"]
    with pytest.raises(FileNotFoundError):              # nothing written: nothing to commit
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


def test_temp_names_are_unique_across_threads(tmp_path):
    names = []
    threads = [threading.Thread(target=lambda: names.extend(temp_path(tmp_path / "a.tar")
                                                            for _ in range(100)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 400


def test_commit_and_discard(tmp_path):
    tmp, out = tmp_path / "x.tar.tmp", tmp_path / "x.tar"
    tmp.write_bytes(b"shard")
    commit(tmp, out)
    assert out.read_bytes() == b"shard" and not tmp.exists()
    discard(tmp)                                        # already gone: fine


def test_temp_target_reads_back_what_temp_path_made(tmp_path):
    for name in ("fusion_ep3.pt", "ucf101-train.index.json", "metrics.jsonl", "LOCK", "a.tar"):
        assert temp_target(temp_path(tmp_path / name).name) == name
    for name in ("fusion_ep3.pt", "a.tar.tmp", ".a.tmp-x-0.pt", ".a.tmp-1.pt", "a.tmp-1-0.pt"):
        assert temp_target(name) is None


def test_remove_temps_removes_only_the_named_files_temporaries(tmp_path):
    stale = [".fusion_ep1.tmp-999-0.pt", ".fusion_ep12.tmp-1-7.pt", ".metrics.tmp-3-9.jsonl"]
    kept = ["fusion_ep1.pt", ".fusion_ep1.tmp-x-0.pt", ".converters.tmp-999-0.pt",
            ".metrics.tmp-3-9.json", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_temps(tmp_path, ["fusion_ep*.pt", "metrics.jsonl"])
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_temps(tmp_path / "missing", ["*"]) == []
