"""S3 backend (boto3): ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

Each entry is one object ``<prefix>/<namespace>/<key[:2]>/<key>``. Writes are
create-only with ``If-None-Match: *`` (412 → already present), carry a content
checksum (``ChecksumAlgorithm`` SHA256 by default, verified by S3 on upload and
by botocore on download with ``ChecksumMode=ENABLED``), and go multipart above
``multipart_threshold``; a failed multipart upload is aborted so no parts
linger and no object appears. Every call runs under botocore's bounded retries
(``standard`` mode, ``max_attempts``) and connect/read timeouts, so an endpoint
that is down costs a bounded time and raises :class:`StoreUnavailable`.

The endpoint is ``endpoint_url`` or ``$AWS_ENDPOINT_URL``; credentials come from
boto3's usual chain. S3 keeps no access time: ``evict_to`` removes the oldest
writes first (``LastModified``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvcodec.store.base import ChunkStore, Verifier
from kvcodec.store.errors import StoreError, StoreUnavailable

__all__ = ["S3ChunkStore"]

_MISSING = {"NoSuchKey", "404", "NotFound"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_UNAVAILABLE = {"SlowDown", "503", "500", "InternalError", "ServiceUnavailable", "RequestTimeout"}


class _Exists(Exception):
    """Internal: a create-only write met an existing object."""


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _EXISTS:
            raise _Exists(code) from None
        if code in _UNAVAILABLE:
            raise StoreUnavailable(f"s3: {what}: {code}: {exc}") from None
        raise StoreError(f"s3: {what}: {code}: {exc}") from None
    except BotoCoreError as exc:  # connection refused, timeouts, checksum failures
        raise StoreUnavailable(f"s3: {what}: {type(exc).__name__}: {exc}") from None


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _MISSING


class S3ChunkStore(ChunkStore):
    """Chunks as S3 objects.

    Args:
        bucket: bucket name.
        prefix: key prefix inside the bucket (may be empty).
        endpoint_url: S3-compatible endpoint (default ``$AWS_ENDPOINT_URL`` or AWS).
        region: region name (default from the environment, else us-east-1).
        timeout_s, connect_timeout_s: per-attempt read and connect timeouts.
        max_attempts: total attempts per call (botocore standard retry mode).
        multipart_threshold: entries larger than this use multipart upload.
        multipart_chunk_bytes: part size (S3's minimum is 5 MiB except the last).
        checksum_algorithm: ``SHA256``, ``CRC32``, ``CRC32C`` or ``SHA1``.
        tenant, verifier: see :class:`ChunkStore`.
    """

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, timeout_s: float = 5.0, connect_timeout_s: float = 2.0,
                 max_attempts: int = 3, multipart_threshold: int = 64 << 20,
                 multipart_chunk_bytes: int = 16 << 20, checksum_algorithm: str = "SHA256",
                 tenant: str = "", verifier: Verifier | str | None = "auto") -> None:
        import boto3
        from botocore.config import Config

        super().__init__(tenant=tenant, verifier=verifier)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunk_bytes = int(multipart_chunk_bytes)
        self.checksum_algorithm = checksum_algorithm.upper()
        config = Config(
            retries={"max_attempts": int(max_attempts), "mode": "standard"},
            connect_timeout=connect_timeout_s, read_timeout=timeout_s,
            s3={"addressing_style": "path"} if self.endpoint_url else {},
            max_pool_connections=32,
        )
        self._s3 = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, config=config,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self._base = "/".join(p for p in (self.prefix, self.namespace) if p) + "/"
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvcodec-s3")

    def _name(self, hexkey: str) -> str:
        return f"{self._base}{hexkey[:2]}/{hexkey}"

    def _get_one(self, hexkey: str) -> bytes | None:
        try:
            with _mapped(f"get {hexkey[:12]}…"):
                try:
                    resp = self._s3.get_object(Bucket=self.bucket, Key=self._name(hexkey),
                                               ChecksumMode="ENABLED")
                except Exception as exc:
                    if _is_missing(exc):
                        return None
                    raise
                return resp["Body"].read()
        except _Exists as exc:
            raise StoreError(f"s3: get {hexkey[:12]}…: unexpected {exc}") from None

    def _read_many(self, hexes: Sequence[str]) -> list[bytes | None]:
        if len(hexes) == 1:
            return [self._get_one(hexes[0])]
        return list(self._pool.map(self._get_one, hexes))

    def _write_new(self, hexkey: str, blob: bytes) -> bool:
        name = self._name(hexkey)
        try:
            if len(blob) > self.multipart_threshold:
                self._multipart(name, blob)
            else:
                with _mapped(f"put {hexkey[:12]}…"):
                    self._s3.put_object(Bucket=self.bucket, Key=name, Body=blob, IfNoneMatch="*",
                                        ChecksumAlgorithm=self.checksum_algorithm)
        except _Exists:
            return False
        return True

    def _write_many(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:  # type: ignore[override]
        items = list(items)
        if len(items) <= 1:
            return [self._write_new(h, b) for h, b in items]
        return list(self._pool.map(lambda item: self._write_new(*item), items))

    def _multipart(self, name: str, blob: bytes) -> None:
        """Upload in parts; abort the upload on any failure (raises _Exists on 412)."""
        with _mapped(f"create multipart {name}"):
            upload = self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=name, ChecksumAlgorithm=self.checksum_algorithm)
        upload_id = upload["UploadId"]
        try:
            parts = []
            step = self.multipart_chunk_bytes
            for number, start in enumerate(range(0, len(blob), step), start=1):
                with _mapped(f"upload part {number} of {name}"):
                    resp = self._s3.upload_part(
                        Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number,
                        Body=blob[start : start + step], ChecksumAlgorithm=self.checksum_algorithm)
                part = {"PartNumber": number, "ETag": resp["ETag"]}
                field = f"Checksum{self.checksum_algorithm}"
                if field in resp:
                    part[field] = resp[field]
                parts.append(part)
            with _mapped(f"complete multipart {name}"):
                self._s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except BaseException:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise

    def _exists(self, hexkey: str) -> bool:
        with _mapped(f"head {hexkey[:12]}…"):
            try:
                self._s3.head_object(Bucket=self.bucket, Key=self._name(hexkey))
            except Exception as exc:
                if _is_missing(exc):
                    return False
                raise
        return True

    def _remove(self, hexkey: str) -> bool:
        existed = self._exists(hexkey)
        with _mapped(f"delete {hexkey[:12]}…"):
            self._s3.delete_object(Bucket=self.bucket, Key=self._name(hexkey))
        return existed

    def _objects(self) -> Iterator[dict[str, Any]]:
        with _mapped("list"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._base)
            for page in pages:
                yield from page.get("Contents", [])

    def _list(self) -> Iterator[str]:
        for obj in self._objects():
            yield obj["Key"].rsplit("/", 1)[-1]

    def _usage(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url}

    def _evict_to(self, max_bytes: int) -> int:
        objects = sorted(self._objects(), key=lambda o: o["LastModified"])
        total = sum(int(o["Size"]) for o in objects)
        evicted = 0
        for obj in objects:
            if total <= max_bytes:
                break
            with _mapped(f"delete {obj['Key']}"):
                self._s3.delete_object(Bucket=self.bucket, Key=obj["Key"])
            total -= int(obj["Size"])
            evicted += 1
        return evicted

    def _ping(self) -> Any:
        with _mapped("head bucket"):
            self._s3.head_bucket(Bucket=self.bucket)
        return {"bucket": self.bucket}

    def pending_uploads(self) -> list[str]:
        """Keys of multipart uploads still open under this store's prefix."""
        with _mapped("list multipart uploads"):
            resp = self._s3.list_multipart_uploads(Bucket=self.bucket, Prefix=self._base)
        return [u["Key"] for u in resp.get("Uploads", [])]

    def close(self) -> None:
        """Stop the worker threads and close the client."""
        self._pool.shutdown(wait=False)
        with contextlib.suppress(Exception):
            self._s3.close()
