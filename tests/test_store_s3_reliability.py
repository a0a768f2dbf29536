"""S3 backend against moto's server on loopback (RELIABILITY.md cases 12, 13; create-only)."""

from __future__ import annotations

import time

import pytest
from _store_fixtures import BULK_OPTIONS, MotoS3, fake_stream, key_of

from kvcodec.store import StoreError, StoreUnavailable, open_store


def _open(s3: MotoS3, bucket: str, **options):
    return open_store(f"s3://{bucket}/kv", endpoint_url=s3.endpoint, **BULK_OPTIONS, **options)


def test_create_only_uses_if_none_match_and_checksums(moto_s3) -> None:
    bucket = moto_s3.new_bucket()
    store = _open(moto_s3, bucket)
    assert store.put(key_of(1), fake_stream(1, 1000)) is True
    assert store.put(key_of(1), fake_stream(2, 1000)) is False
    head = moto_s3.client().head_object(Bucket=bucket, Key=store._name(key_of(1)),
                                        ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")
    assert store.get(key_of(1)) == fake_stream(1, 1000)


def test_endpoint_from_environment(moto_s3, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    store = open_store(f"s3://{moto_s3.new_bucket()}/p", **BULK_OPTIONS)
    assert store.endpoint_url == moto_s3.endpoint and store.health()["ok"]


def test_multipart_upload_roundtrip(moto_s3) -> None:
    store = _open(moto_s3, moto_s3.new_bucket(), multipart_threshold=5 << 20,
                  multipart_chunk_bytes=5 << 20)
    blob = fake_stream(3, 12 << 20)
    assert store.put(key_of(3), blob) is True
    assert store.put(key_of(3), blob) is False  # completion is create-only too
    assert store.get(key_of(3)) == blob
    assert store.pending_uploads() == []


def test_failed_multipart_is_aborted_and_invisible(moto_s3) -> None:
    # Parts below S3's 5 MiB minimum make CompleteMultipartUpload fail (EntityTooSmall)
    # after every part was uploaded: a real failure half-way through the protocol.
    store = _open(moto_s3, moto_s3.new_bucket(), multipart_threshold=1 << 20,
                  multipart_chunk_bytes=1 << 20)
    with pytest.raises(StoreError, match="EntityTooSmall"):
        store.put(key_of(4), fake_stream(4, 3 << 20))
    assert not store.has(key_of(4)) and store.get(key_of(4)) is None
    assert store.pending_uploads() == []  # aborted: no parts linger


def test_stopped_endpoint_is_bounded_and_degraded() -> None:
    s3 = MotoS3()
    bucket = s3.new_bucket()
    store = _open(s3, bucket, timeout_s=1, connect_timeout_s=0.5, max_attempts=2)
    store.put(key_of(1), fake_stream(1, 100))
    s3.stop()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="s3"):
        store.get(key_of(1))
    with pytest.raises(StoreUnavailable):
        store.put(key_of(2), fake_stream(2, 100))
    health = store.health()
    assert health["ok"] is False and health["status"] == "degraded"
    assert time.monotonic() - start < 15


def test_slow_endpoint_times_out_within_bounds() -> None:
    """An endpoint that accepts connections but never answers (a hung proxy)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        store = open_store("s3://slow-bucket/kv", endpoint_url=f"http://127.0.0.1:{port}",
                           timeout_s=0.5, connect_timeout_s=0.5, max_attempts=2, **BULK_OPTIONS)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="s3: get"):
            store.get(key_of(1))
        elapsed = time.monotonic() - start
        assert elapsed < 6, elapsed  # 2 attempts x 0.5 s read timeout + backoff
        assert store.health()["status"] == "degraded"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()
