"""Where a cache lives: a local folder or a URL, opened through fsspec (the one opener).

A root the user typed is a local path or a URL: ``s3://`` (AWS, or MinIO / Ceph / R2 through
``AWS_ENDPOINT_URL``, as boto reads it), ``gs://``, ``az://``, ``http(s)://`` and ``hf://`` (read
only). ``pipe:`` and ``file:`` stay with ``webdataset.gopen`` and are only ever the user's own
typing (``bombkd_io.names.locate`` builds every shard location from that root plus a checked
name). The engines are optional extras: a missing one is a ``MissingExtraError`` naming
``pip install 'bombkd[s3]'`` (gcs, azure, http; hf:// comes with the video extra).

    is_remote        whether a root is an fsspec URL (not a path, not pipe:/file:)
    filesystem       (fsspec filesystem, path) of a URL; credentials from the engine's usual
                     places (env vars, config files, instance roles); none are logged
    open_remote      a remote object for reading, as a file (large sequential reads)
    read_head        a remote object's first bytes (a whole shard) in one GET
    list_names       the file names directly under a root (local or remote)
    read_bytes       a small file (a manifest) under a root, refused above a size limit
    exists / size    whether a file or object is there; its bytes (None when it is not)
    upload / remove  write side (s3, gs, az): ``featurize`` / ``import-cache --out URL``
                     (remove deletes a local file too)
    retrying         a call retried with backoff on transient errors (connection reset, 5xx,
                     throttling); then a ``ShardError`` naming the object
    access_error     an error naming the URL and the credential source tried (never the secret)
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from bombkd_io.errors import ConfigError, DatasetError, ShardError, needs_extra

T = TypeVar("T")

# scheme -> (the bombkd extra that brings its fsspec engine, the engine's module, whether
# bombkd may write there)
SCHEMES = {"s3": ("s3", "s3fs", True), "s3a": ("s3", "s3fs", True),
           "gs": ("gcs", "gcsfs", True), "gcs": ("gcs", "gcsfs", True),
           "az": ("azure", "adlfs", True), "abfs": ("azure", "adlfs", True),
           "http": ("http", "aiohttp", False), "https": ("http", "aiohttp", False),
           "hf": ("hf", "huggingface_hub", False)}
READ_BLOCK = 64 << 20  # bytes per ranged GET when a shard is streamed: one or a few per shard
RETRIES = 4            # attempts after the first, on a transient error
BACKOFF_S = 0.25       # first wait; doubled each attempt, with jitter
# transient failures by exception class name (botocore, aiohttp, urllib3 spell them so)
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                   "ConnectTimeoutError", "ClientPayloadError", "ServerDisconnectedError",
                   "ClientOSError", "ResponseStreamingError", "IncompleteReadError",
                   "ProtocolError", "ServerTimeoutError", "ClientConnectionError"}
TRANSIENT_WORDS = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable",
                   " 500", " 502", " 503", " 504", "Connection reset", "reset by peer",
                   "Server disconnected", "Response payload is not completed")


def scheme(root) -> str | None:
    """The URL scheme of a root the user typed (``s3``), or None for a local path."""
    if not isinstance(root, str) or "://" not in root:
        return None
    return root.split("://", 1)[0].lower()


def is_remote(root) -> bool:
    """Whether ``root`` is a URL fsspec opens (``s3://``, ``gs://``, ``https://``...)."""
    return scheme(root) in SCHEMES


def check_root(root, argument: str, *, write: bool = False) -> None:
    """Refuse a URL scheme bombkd does not know, or a read-only one to write to."""
    name = scheme(root)
    if name is None or name == "file":
        return
    if name not in SCHEMES:
        raise ConfigError(f"{argument} {root}: unknown URL scheme {name!r}; bombkd reads a local "
                          f"path or {', '.join(s + '://' for s in SCHEMES)}")
    if write and not SCHEMES[name][2]:
        raise ConfigError(f"{argument} {root}: {name}:// is read only; write the cache to a "
                          "local folder, s3://, gs:// or az://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; ``MissingExtraError`` naming the extra."""
    check_root(url, "cache")
    extra, module, _ = SCHEMES[scheme(url)]
    with needs_extra(extra):
        importlib.import_module(module)
        from fsspec.core import url_to_fs
    fs, path = url_to_fs(url, **_options(scheme(url)))
    if extra == "s3":
        fs.retries = 1  # s3fs's own retries off: ``retrying`` is the one bound (see _options)
    return fs, path


def _options(name: str) -> dict:
    """Options for the engine: none beyond its own defaults, so credentials and endpoints come
    from where it looks (``AWS_ENDPOINT_URL`` is read by botocore itself); the listing cache
    off, so what another process wrote is seen; for S3 botocore's retries off, so a failing
    store is retried ``RETRIES`` times in all, not that times botocore's and s3fs's. fsspec keeps
    one instance per process."""
    if name in ("s3", "s3a"):
        return {"use_listings_cache": False, "config_kwargs": {"retries": {"max_attempts": 1}}}
    return {"use_listings_cache": False} if name in ("gs", "gcs", "az", "abfs") else {}


def credential_source(url: str) -> str:
    """Which credentials the engine tried for ``url``, in words (never their values)."""
    name = scheme(url)
    if name in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        at = f" at endpoint {endpoint}" if endpoint else ""
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            return f"the environment's AWS_ACCESS_KEY_ID{at}"
        if os.environ.get("AWS_PROFILE"):
            return f"profile {os.environ['AWS_PROFILE']!r} of the AWS config files{at}"
        return f"boto's default chain (~/.aws/credentials, config files, instance role){at}"
    if name in ("gs", "gcs"):
        return ("GOOGLE_APPLICATION_CREDENTIALS" if os.environ.get(
            "GOOGLE_APPLICATION_CREDENTIALS") else "gcloud's default credentials")
    if name in ("az", "abfs"):
        return "the AZURE_STORAGE_* environment variables or Azure's default credential"
    if name == "hf":
        return "HF_TOKEN or the token saved by `huggingface-cli login`" if os.environ.get(
            "HF_TOKEN") else "no token (anonymous)"
    return "none (anonymous)"


def access_error(url: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"{url}: access denied ({type(exc).__name__}); tried the credentials of "
                        f"{credential_source(url)}; check them and the bucket's permissions")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """A connection reset, a timeout, a 5xx or throttling: worth another try."""
    for e in _chain(exc):
        if isinstance(e, (PermissionError, FileNotFoundError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in TRANSIENT_NAMES:
            return True
        if any(word in str(e) for word in TRANSIENT_WORDS):
            return True
    return False


def is_denied(exc: BaseException) -> bool:
    return any(isinstance(e, PermissionError) or "AccessDenied" in str(e) or
               "InvalidAccessKeyId" in str(e) or "SignatureDoesNotMatch" in str(e)
               for e in _chain(exc))


def retrying(call: Callable[[], T], url: str, *, retries: int | None = None,
             backoff_s: float | None = None) -> T:
    """``call()``, tried again after a transient error (``retries`` times, waits doubling from
    ``backoff_s``); then a ShardError naming ``url`` and the attempts. Access errors and
    missing objects are not retried: ``DatasetError`` / ``ShardError`` naming the URL."""
    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(retries + 1):
        try:
            return call()
        except ShardError:
            raise
        except Exception as exc:  # the engines raise their own types (botocore, aiohttp)
            if is_denied(exc):
                raise access_error(url, exc) from exc
            if isinstance(exc, FileNotFoundError):
                raise ShardError(url, "no such object") from exc
            if not is_transient(exc):
                raise ShardError(url, f"cannot read ({type(exc).__name__}: {exc})") from exc
            if attempt == retries:
                raise ShardError(url, f"failed {retries + 1} times with transient errors, the "
                                 f"last {type(exc).__name__}: {exc}",
                                 fix="check the connection to the store and run again, or "
                                     "pass --on-error skip") from exc
            time.sleep(backoff_s * 2 ** attempt * (1 + random.random() / 2))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def open_remote(url: str) -> Iterator:
    """A remote object as a read-only file; reads of up to ``READ_BLOCK`` are one ranged GET
    each (no read-ahead cache: the reader asks for the whole shard at once)."""
    fs, path = filesystem(url)
    with fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none") as f:
        yield f


def read_head(url: str, limit: int) -> bytes:
    """At most the first ``limit`` bytes of a remote object, in one GET (as a plain download
    of it would be): a shard is read this way, whole, with a bound on what a stranger's object
    can make us hold."""
    fs, path = filesystem(url)
    return fs.cat_file(path, start=0, end=limit)


def list_names(root) -> list[str]:
    """The names of the files directly under ``root`` (empty for a folder that does not
    exist); ``DatasetError`` for a local root that is not a directory."""
    if not is_remote(root):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such cache directory (make one with "
                               "`bombkd featurize`)")
        return sorted(p.name for p in root.iterdir())
    fs, path = filesystem(root)

    def ls() -> list[str]:
        try:
            return sorted(Path(p).name for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
    return retrying(ls, root)


def read_bytes(url, limit: int) -> bytes:
    """A whole small file (local path or URL), refused with ``ValueError`` above ``limit``."""
    if not is_remote(url):
        path = Path(url)
        if path.stat().st_size > limit:
            raise ValueError(f"{path.stat().st_size} bytes, over the limit of {limit}")
        return path.read_bytes()

    def read() -> bytes:
        with open_remote(url) as f:
            if f.size > limit:
                raise ValueError(f"{f.size} bytes, over the limit of {limit}")
            return f.read()
    return retrying(read, url)


def exists(url) -> bool:
    if not is_remote(url):
        return Path(url).is_file()
    fs, path = filesystem(url)
    return retrying(lambda: fs.exists(path), url)


def size(url) -> int | None:
    """The bytes of a file or object; None when it is not there."""
    if not is_remote(url):
        return Path(url).stat().st_size if Path(url).is_file() else None
    fs, path = filesystem(url)

    def get() -> int | None:
        try:
            return fs.size(path)
        except FileNotFoundError:
            return None
    return retrying(get, url)


def upload(local: str | Path, url: str) -> None:
    """Put a finished local file at ``url`` (one object; visible whole or not at all)."""
    fs, path = filesystem(url)
    retrying(lambda: fs.put_file(str(local), path), url)


def remove(url) -> None:
    """Delete the file or object at ``url`` (gone already is fine)."""
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    fs, path = filesystem(url)
    try:
        retrying(lambda: fs.rm_file(path), url)
    except ShardError as exc:
        if "no such object" not in str(exc):
            raise
