"""Local store: killed writers, temp sweep, disk full, LRU capacity (RELIABILITY.md case 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _store_fixtures import BULK_OPTIONS, chunk_stream, fake_stream, key_of

from kvcodec.store import StoreFull, open_store
from kvcodec.store.local import LocalChunkStore

WRITER = r"""
import sys, itertools, hashlib
sys.path.insert(0, sys.argv[2])
from _store_fixtures import BULK_OPTIONS, fake_stream
from kvcodec.store.local import LocalChunkStore
store = LocalChunkStore(sys.argv[1], **BULK_OPTIONS)
for i in itertools.count():
    store.put(hashlib.sha256(str(i).encode()).hexdigest(), fake_stream(i, 2_000_000))
    if i == 0:
        print("ready", flush=True)
"""


def test_killed_writer_leaves_no_partial_entry(tmp_path: Path) -> None:
    root = tmp_path / "store"
    tests_dir = str(Path(__file__).parent)
    for delay in (0.05, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), tests_dir],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    store = LocalChunkStore(root, **BULK_OPTIONS)
    assert list((root / "tmp").iterdir()) == []  # the dead writer's temp files are swept
    report = store.scrub(remove=False)
    assert report["bad"] == [] and report["checked"] >= 1
    assert store.stats()["entries"] == report["checked"]  # index reconciled with the files


def test_stale_temp_files_are_swept_at_open(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path)
    store.put(key_of(1), chunk_stream(1))
    store.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "tmp" / f"{dead}.abcd.1234.tmp").write_bytes(b"half a chunk")
    live = tmp_path / "tmp" / f"{os.getpid()}.abcd.5678.tmp"
    live.write_bytes(b"being written by a live process")
    old = tmp_path / "tmp" / f"{os.getpid()}.abcd.9999.tmp"
    old.write_bytes(b"abandoned long ago")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store = LocalChunkStore(tmp_path)
    assert store.swept == 2
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [live.name]
    assert store.get(key_of(1)) == chunk_stream(1)


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_raises_store_full_and_reads_keep_working(small_disk: Path) -> None:
    store = LocalChunkStore(small_disk / "store", **BULK_OPTIONS)
    stored = []
    with pytest.raises(StoreFull, match="no space left"):
        for i in range(100):
            store.put(key_of(i), fake_stream(i, 400_000))
            stored.append(i)
    assert stored, "some entries fit before the disk filled"
    assert list((small_disk / "store" / "tmp").iterdir()) == []  # failed temp removed
    for i in stored:
        assert store.get(key_of(i)) == fake_stream(i, 400_000)
    assert not store.has(key_of(len(stored)))
    store.delete(key_of(stored[0]))  # room again: writes work
    assert store.put(key_of(999), fake_stream(999, 100_000)) is True


def test_lru_capacity_evicts_least_recently_read(tmp_path: Path) -> None:
    size = len(fake_stream(0, 10_000)) + 80
    store = LocalChunkStore(tmp_path, capacity_bytes=4 * size, **BULK_OPTIONS)
    for i in range(4):
        store.put(key_of(i), fake_stream(i, 10_000))
        time.sleep(0.002)
    assert store.get(key_of(0)) is not None  # 0 becomes the most recently used
    store.put(key_of(4), fake_stream(4, 10_000))
    assert sorted(store.keys()) == sorted(key_of(i) for i in (0, 2, 3, 4))  # 1 was oldest
    assert store.stats()["bytes"] <= 4 * size and store.stats()["evictions"] == 1
    with pytest.raises(StoreFull, match="exceeds capacity"):
        store.put(key_of(9), fake_stream(9, 50_000))


def test_recency_survives_reopen_and_other_processes_share_usage(tmp_path: Path) -> None:
    a = LocalChunkStore(tmp_path)
    b = open_store(f"file://{tmp_path}")
    a.put(key_of(1), chunk_stream(1))
    b.put(key_of(2), chunk_stream(2))
    assert a.stats()["entries"] == b.stats()["entries"] == 2
    a.get(key_of(1))
    a.close()
    b.evict_to(len(chunk_stream(1)) + 100)
    assert list(b.keys()) == [key_of(1)]  # 2 was written earlier than 1's last read


def test_bad_entry_in_index_but_not_on_disk_is_forgotten(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path)
    store.put(key_of(1), chunk_stream(1))
    store.close()
    next((tmp_path / "objects").rglob(key_of(1))).unlink()
    store = LocalChunkStore(tmp_path)
    assert store.stats()["entries"] == 0 and store.get(key_of(1)) is None
