"""32 concurrent writers of one key with polling readers (RELIABILITY.md case 14)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _store_fixtures import BULK_OPTIONS, fake_stream, key_of

from kvcodec.store.local import LocalChunkStore

WRITERS, READERS = 32, 4
SIZE = 1_000_000


@pytest.mark.parametrize("kind", ["memory", "local", "redis", "s3", "tiered"])
def test_32_writers_one_key_readers_never_see_partial(make_store, kind: str) -> None:
    store = make_store(kind, **BULK_OPTIONS)
    blob = fake_stream(7, SIZE)
    barrier = threading.Barrier(WRITERS + READERS)
    results: list[bool] = []
    errors: list[BaseException] = []
    seen: list[bytes] = []
    done = threading.Event()

    def writer() -> None:
        barrier.wait()
        try:
            results.append(store.put(key_of(7), blob))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    def reader() -> None:
        barrier.wait()
        while not done.is_set():
            got = store.get(key_of(7))
            if got is not None:
                seen.append(got)
            time.sleep(0.001)  # let writers have the GIL
        seen.append(store.get(key_of(7)))

    threads = [threading.Thread(target=writer) for _ in range(WRITERS)]
    threads += [threading.Thread(target=reader) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads[:WRITERS]:
        t.join(60)
    done.set()
    for t in threads[WRITERS:]:
        t.join(60)
    assert errors == []
    assert sorted(results) == [False] * (WRITERS - 1) + [True]  # exactly one created it
    assert seen and all(s == blob for s in seen)
    assert store.stats()["bad_entries"] == 0


PROC = r"""
import sys, threading
sys.path.insert(0, sys.argv[2])
from _store_fixtures import BULK_OPTIONS, fake_stream, key_of
from kvcodec.store.local import LocalChunkStore
store = LocalChunkStore(sys.argv[1], **BULK_OPTIONS)
blob = fake_stream(int(sys.argv[3]), 1_000_000)
out = []
def put():
    out.append(store.put(key_of(1), blob))
threads = [threading.Thread(target=put) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
reads = [store.get(key_of(1)) for _ in range(20)]
assert all(r is not None and r[:4] == b"TKVC" for r in reads)
print(sum(out), len({r for r in reads}))
"""


def test_local_writers_in_two_processes_with_different_payloads(tmp_path: Path) -> None:
    """Even if writers disagree on the bytes, exactly one version exists and is served."""
    tests_dir = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", PROC, str(tmp_path), tests_dir, str(seed)],
                              stdout=subprocess.PIPE, text=True) for seed in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(o[0]) for o in outs) == 1  # one create across 2 x 16 writers
    assert all(o[1] == "1" for o in outs)     # every process saw one consistent value
    store = LocalChunkStore(tmp_path, **BULK_OPTIONS)
    assert store.get(key_of(1)) in {fake_stream(s, 1_000_000) for s in range(2)}
    assert list((tmp_path / "tmp").iterdir()) == [] and store.stats()["entries"] == 1
