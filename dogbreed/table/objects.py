"""Small objects of dogbreed's own under ``OUT/_dogbreed/<folder>/`` on any store: the table's marker, the lock's
generations, the records of runs in progress.

Each store offers the same five calls. ``create`` is create-if-absent (If-None-Match: * on S3, ifGenerationMatch=0
on GCS, a hard link locally), which exactly one of several writers can win; ``put`` replaces. Local writes go
through a temporary file in the same folder that is removed whatever happens, so a full disk leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Protocol

from dogbreed.errors import Failed

META_DIR = "_dogbreed"  # a leading underscore: Delta and Parquet readers skip it
LOG_DIR = "_delta_log"  # the Delta table's log


class Objects(Protocol):
    def names(self) -> list[str]: ...
    def get(self, name: str) -> bytes | None: ...
    def create(self, name: str, data: bytes) -> bool: ...
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


def temporary_name(name: str) -> str:
    """The temporary file a local create or put writes before it links or renames it into `name`."""
    return f".{name}.{uuid.uuid4().hex}"


def is_temporary(entry: str, name: str) -> bool:
    """Whether `entry` is a temporary file of `name` (:func:`temporary_name`): a create in progress, or a killed one."""
    return re.fullmatch(r"\." + re.escape(name) + r"\.[0-9a-f]{32}", entry) is not None


class LocalObjects:
    """A folder on a local (or NFS) file system."""

    def __init__(self, root: str, folder: str):
        self.dir = Path(root, META_DIR, folder) if folder else Path(root, META_DIR)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def get(self, name: str) -> bytes | None:
        try:
            return (self.dir / name).read_bytes()
        except FileNotFoundError:
            return None

    def _temp(self, name: str, data: bytes) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / temporary_name(name)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half-written temporary file (disk full) never stays
            raise
        return tmp

    def create(self, name: str, data: bytes) -> bool:
        tmp = self._temp(name, data)
        try:
            os.link(tmp, self.dir / name)  # atomic and with its content, unlike O_EXCL + write
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put(self, name: str, data: bytes) -> None:
        tmp = self._temp(name, data)
        try:
            os.replace(tmp, self.dir / name)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)


def _key_prefix(root: str, folder: str) -> tuple[str, str]:
    bucket, _, prefix = root.partition("/")
    return bucket, "/".join(p for p in (prefix, META_DIR, folder) if p) + "/"


class S3Objects:
    """A prefix on S3 or an S3-compatible store (AWS_ENDPOINT_URL), through boto3's credential chain."""

    def __init__(self, root: str, folder: str):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = _key_prefix(root, folder)
        # Every request is bounded: a store that stops answering costs a lease or a sentence, never a hang.
        self.s3 = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=15,
                                                   retries={"max_attempts": 3, "mode": "standard"}))

    def names(self) -> list[str]:
        r = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
        return sorted(o["Key"][len(self.prefix):] for o in r.get("Contents", []) if o["Key"].endswith(".json"))

    def get(self, name: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def create(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def put(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def delete(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)


class GCSObjects:
    """A prefix on Google Cloud Storage (google-cloud-storage, application default credentials)."""

    def __init__(self, root: str, folder: str):
        try:
            from google.cloud import storage
        except ImportError:
            raise Failed("gs:// output needs the google-cloud-storage package (pip install 'dogbreed[gcs]')") from None
        bucket, self.prefix = _key_prefix(root, folder)
        self.bucket = storage.Client().bucket(bucket)

    def names(self) -> list[str]:
        return sorted(b.name[len(self.prefix):] for b in self.bucket.list_blobs(prefix=self.prefix, delimiter="/",
                                                                                 timeout=15) if b.name.endswith(".json"))

    def get(self, name: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(self.prefix + name).download_as_bytes(timeout=15)
        except NotFound:
            return None

    def create(self, name: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.bucket.blob(self.prefix + name).upload_from_string(data, if_generation_match=0, timeout=15)
            return True
        except PreconditionFailed:
            return False

    def put(self, name: str, data: bytes) -> None:
        self.bucket.blob(self.prefix + name).upload_from_string(data, timeout=15)

    def delete(self, name: str) -> None:
        self.bucket.blob(self.prefix + name).delete(timeout=15)


def objects(uri: str, root: str, folder: str) -> Objects:
    """The objects under OUT/_dogbreed/<folder>/ of the table at `uri` (root: its path on its file system)."""
    if "://" not in uri:
        return LocalObjects(root, folder)
    return S3Objects(root, folder) if uri.startswith("s3://") else GCSObjects(root, folder)
