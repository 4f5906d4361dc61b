"""Where files live: a local path, or any URL fsspec understands (`s3://`, `gs://`, `hf://`, `file://`).

Local paths keep using the operating system directly (no overhead, and the safety rules of
`atomic.py`/`guard.py` apply as they are). A URL goes through fsspec: credentials and options as fsspec
users already set them (the environment, `~/.aws`, ...), plus `--storage_options JSON` (kept here for
the process and handed to Ray workers through the `VARALIGN_STORAGE_OPTIONS` environment variable).
Reads are ranged requests in large blocks with the next block fetched in the background, so a
streamed npz member or parquet column is not latency-bound and no shard is copied whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import VaralignError

ENV = "VARALIGN_STORAGE_OPTIONS"
BLOCK = 16 << 20  # bytes per ranged request when streaming a remote file
_options: dict[str, Any] | None = None


def is_url(path: object) -> bool:
    """A remote location (a `scheme://` other than `file://`)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local(path: object) -> str:
    """A local path as a plain string (`file://` stripped)."""
    text = os.fspath(path) if not isinstance(path, str) else path
    return text[len("file://"):] if text.startswith("file://") else text


def configure(options: dict[str, Any] | str | None) -> None:
    """Set the storage options of this process (a dict, or its JSON text); None: from the environment."""
    global _options
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as exc:
            raise VaralignError(f"--storage_options is not valid JSON ({exc})") from None
        if not isinstance(options, dict):
            raise VaralignError("--storage_options must be a JSON object")
    _options = dict(options) if options else None
    if _options:
        os.environ[ENV] = json.dumps(_options)


def options() -> dict[str, Any]:
    global _options
    if _options is None:
        text = os.environ.get(ENV)
        _options = json.loads(text) if text else {}
    return _options


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path within it."""
    try:
        import fsspec  # noqa: PLC0415
    except ImportError:
        raise VaralignError("a URL needs fsspec (and s3fs/gcsfs for s3://, gs://): pip install 'varalign[cloud]'",
                            url) from None
    scheme = url.split("://", 1)[0]
    opts = options()
    scoped = opts.get(scheme, opts) if isinstance(opts.get(scheme), dict) else opts
    try:
        return fsspec.core.url_to_fs(url, **scoped)
    except (ImportError, ValueError) as exc:
        raise VaralignError(f"cannot open {scheme}:// ({_short(exc)})", url) from None


def open_read(path: object, block_size: int = BLOCK, background: bool = True) -> IO[bytes]:
    """A binary file for reading: `open()` for a local path; for a URL an fsspec file reading
    `block_size` bytes per ranged request, the next block fetched in the background while the
    current one is used (`background=False`: a plain readahead, for a few small reads)."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, p = filesystem(str(path))
    try:
        return fs.open(p, "rb", block_size=block_size, cache_type="background" if background else "readahead")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors: one line naming the URL
        raise remote_error(exc, path) from None


def open_range(path: object, offset: int, size: int, block_size: int = BLOCK) -> IO[bytes]:
    """A file positioned at `offset` from which `size` bytes are read: a local file, or for a URL a
    reader that fetches exactly that byte range, `block_size` bytes per request, with the next request
    in flight while the current block is used (an npz member: nothing before or after it is fetched)."""
    if not is_url(path):
        fh = open(local(path), "rb")
        fh.seek(offset)
        return fh
    return _RangeReader(str(path), offset, size, block_size)


class _RangeReader(io.RawIOBase):
    """Sequential reads of one byte range of an object, one request ahead (see `open_range`)."""

    def __init__(self, url: str, offset: int, size: int, block_size: int) -> None:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        self.fs, self.path = filesystem(url)
        self.url, self.pos, self.end, self.block = url, offset, offset + size, block_size
        self.pool = ThreadPoolExecutor(1)
        self.next = self._request(self.pos)
        self.buf, self.buf_pos = b"", 0

    def _request(self, start: int):
        if start >= self.end:
            return None
        stop = min(start + self.block, self.end)
        return self.pool.submit(self.fs.cat_file, self.path, start=start, end=stop)

    def _fill(self) -> bool:
        if self.buf_pos < len(self.buf):
            return True
        if self.next is None:
            return False
        try:
            self.buf = self.next.result()
        except Exception as exc:  # noqa: BLE001
            raise remote_error(exc, self.url) from None
        self.buf_pos = 0
        self.pos += len(self.buf)
        self.next = self._request(self.pos) if self.buf else None
        return bool(self.buf)

    def readable(self) -> bool:
        return True

    def readinto(self, view) -> int:
        if not self._fill():
            return 0
        n = min(len(view), len(self.buf) - self.buf_pos)
        view[:n] = self.buf[self.buf_pos : self.buf_pos + n]
        self.buf_pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(self.block), b""))
        if not self._fill():
            return b""
        out = self.buf[self.buf_pos : self.buf_pos + n]
        self.buf_pos += len(out)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def read_ranges(path: object, ranges: list[tuple[int, int]], block_size: int = BLOCK, gap: int = 1 << 20,
                ahead: int = 4) -> Iterator[bytes]:
    """The bytes of each `(offset, size)` of `ranges` (offsets non-decreasing), in order: a local file by
    seek + read; a URL by requests that each cover neighbouring ranges (a gap under `gap` bytes is read
    through) up to `block_size` bytes, `ahead` requests in flight (tar members of a subset's samples:
    only their bytes and small gaps are fetched, and the latency of one request hides behind the others)."""
    if not is_url(path):
        with open(local(path), "rb") as fh:
            for offset, size in ranges:
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise VaralignError(f"short read at byte {offset}: truncated since it was read", path)
                yield data
        return
    from collections import deque  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    spans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for offset, size in ranges:
        if spans and spans[-1][0] <= offset <= spans[-1][1] + gap \
                and max(spans[-1][1], offset + size) - spans[-1][0] <= block_size:
            spans[-1] = (spans[-1][0], max(spans[-1][1], offset + size), spans[-1][2] + [(offset, size)])
        else:
            spans.append((offset, offset + size, [(offset, size)]))
    fs, p = filesystem(str(path))
    todo = iter(spans)
    with ThreadPoolExecutor(ahead) as pool:
        flight = deque()
        for span in todo:
            flight.append((span, pool.submit(fs.cat_file, p, start=span[0], end=span[1])))
            if len(flight) >= ahead:
                break
        while flight:
            (start, end, parts), future = flight.popleft()
            try:
                data = future.result()
            except Exception as exc:  # noqa: BLE001
                raise remote_error(exc, path) from None
            if len(data) != end - start:  # the object is shorter than when it was indexed
                raise VaralignError(f"short read at byte {start}: the object changed since it was read", path)
            span = next(todo, None)
            if span is not None:
                flight.append((span, pool.submit(fs.cat_file, p, start=span[0], end=span[1])))
            for offset, size in parts:
                yield data[offset - start : offset - start + size]


_TRANSIENT = ("Timeout", "Connection", "Disconnected", "Payload", "IncompleteRead", "HTTPClientError",
              "ResponseStreamingError", "ResponseParserError")


# S3 error codes (and their STS/IAM cousins) that mean the key or token is wrong, not that a policy refuses
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                               "TokenRefreshRequired", "InvalidSecurity", "ExpiredTokenException",
                               "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure"})


def _error_code(exc: BaseException) -> str | None:
    """The service's error code (botocore's `response["Error"]["Code"]`) of `exc` or of the exception it was
    raised from (s3fs keeps botocore's ClientError as the cause of the OSError it raises)."""
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return response["Error"].get("Code")
        # the context too (s3fs raises some without a cause, inside the except), unless it was suppressed
        exc, seen = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__), seen + 1
    return None


def remote_error(exc: BaseException, path: object) -> VaralignError | FileNotFoundError:
    """A storage backend's exception as one line naming the URL (missing bucket, credentials, permission).
    The exception's type decides first (s3fs and gcsfs turn 404/403 into FileNotFoundError/PermissionError;
    a timeout or a dropped connection is a storage error whatever its message says, so "reset after 404
    bytes" is not "not found"); only an untyped error is read for an S3 error code or HTTP status."""
    text = _short(exc)
    low = text.lower()
    names = " ".join(c.__name__ for c in type(exc).__mro__)
    code = _error_code(exc)
    bad_key = code in _CREDENTIAL_CODES  # s3fs turns these into PermissionError too: not a policy's refusal
    credentials = (f"no usable credentials ({f'{code}: ' if bad_key else ''}{text}); set them as for fsspec/boto, "
                   "or --storage_options")
    if bad_key:
        return VaralignError(credentials, path)
    if isinstance(exc, FileNotFoundError):
        return VaralignError(f"not found ({text})", path)
    if isinstance(exc, PermissionError):
        return VaralignError(f"permission denied ({text})", path)
    if "NoCredentials" in names or "PartialCredentials" in names:
        return VaralignError(credentials, path)
    if isinstance(exc, (TimeoutError, ConnectionError)) or any(t in names for t in _TRANSIENT):
        return VaralignError(f"storage error ({text})", path)
    if re.search(r"nosuchbucket|nosuchkey|\bnot found\b|\b404\b", low):
        return VaralignError(f"not found ({text})", path)
    if re.search(r"accessdenied|\bforbidden\b|\b403\b", low):
        return VaralignError(f"permission denied ({text})", path)
    if re.search(r"credential|signature|invalidaccesskeyid", low):
        return VaralignError(credentials, path)
    return VaralignError(f"storage error ({text})", path)


def info(path: object) -> dict[str, Any]:
    """Size, and for a URL its ETag (or version/mtime): what tells whether an object changed."""
    if not is_url(path):
        st = os.stat(local(path))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, p = filesystem(str(path))
    try:
        meta = fs.info(p)
    except FileNotFoundError:
        raise VaralignError("not found", path) from None
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, path) from None
    out = {"size": int(meta.get("size") or 0)}
    for key in ("ETag", "etag", "VersionId", "md5Hash", "LastModified", "mtime", "last_modified"):
        if meta.get(key) is not None:
            out[key.lower()] = str(meta[key])
    return out


def listdir(path: object, refresh: bool = False) -> list[str]:
    """Names (not paths) in a folder or prefix; a missing one raises VaralignError. `refresh`: list
    again rather than from fsspec's listing cache (a folder another process is writing)."""
    if not is_url(path):
        return os.listdir(local(path))
    fs, p = filesystem(str(path))
    try:
        if refresh:
            fs.invalidate_cache(p)
        if not fs.isdir(p):
            raise VaralignError("metadata directory not found", path)
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)]
    except VaralignError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, path) from None


def isdir(path: object) -> bool:
    return os.path.isdir(local(path)) if not is_url(path) else bool(_remote(path, "isdir"))


def exists(path: object) -> bool:
    return os.path.exists(local(path)) if not is_url(path) else bool(_remote(path, "exists"))


def _remote(path: object, method: str) -> Any:
    """`fs.<method>(path)` on the URL's filesystem; its errors as one line naming the URL."""
    fs, p = filesystem(str(path))
    try:
        return getattr(fs, method)(p)
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, path) from None


def isfile(path: object) -> bool:
    return os.path.isfile(local(path)) if not is_url(path) else bool(_remote(path, "isfile"))


def read_bytes(path: object, size: int = -1) -> bytes:
    """The whole file (or its first `size` bytes) in one request; a missing one raises VaralignError."""
    if not is_url(path):
        with open(local(path), "rb") as fh:
            return fh.read(size)
    fs, p = filesystem(str(path))
    try:
        return fs.cat_file(p, start=0, end=size if size >= 0 else None)
    except FileNotFoundError:
        raise VaralignError("not found", path) from None
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, path) from None


def join(base: object, name: str) -> str:
    text = str(base)
    if is_url(text):
        return text.rstrip("/") + "/" + name
    return str(Path(local(text)) / name)


def as_path(path: object) -> Path | str:
    """A URL as its text, anything else as a Path (`Path()` would fold a URL's `//`)."""
    return str(path).rstrip("/") if is_url(path) else Path(local(path))


def basename(path: object) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(local(path)).name


def parent(path: object) -> Path | str:
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_url(path) else Path(local(path)).parent


def arrow_filesystem(path: object) -> tuple[Any, str]:
    """(pyarrow filesystem, path) to read a parquet at `path` with pyarrow (None for a local path)."""
    if not is_url(path):
        return None, local(path)
    fs, p = filesystem(str(path))
    from pyarrow.fs import FSSpecHandler, PyFileSystem  # noqa: PLC0415

    return PyFileSystem(FSSpecHandler(fs)), p


def check_writable(url: str) -> None:
    """Before any work: the bucket (or top folder) of an output URL exists and we may list it (so a
    missing bucket or missing credentials are a one-line error now, not after hours of work)."""
    fs, p = filesystem(url)
    bucket = p.split("/", 1)[0]
    try:
        if fs.isdir(p.rstrip("/")) and not p.endswith("/"):
            raise VaralignError("output path is a directory (a prefix with objects under it)", url)
        if not fs.exists(bucket):
            raise VaralignError(f"bucket {bucket!r} not found", url)
        fs.ls(bucket, detail=False)
    except VaralignError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, url) from None


def check_folder(url: str) -> list[str]:
    """Before any work: an output folder URL's bucket exists, we may list it, and the URL is no object;
    the names already under the folder (none for a new one)."""
    fs, p = filesystem(url)
    bucket = p.split("/", 1)[0]
    try:
        if not fs.exists(bucket):
            raise VaralignError(f"bucket {bucket!r} not found", url)
        fs.ls(bucket, detail=False)
        if fs.isfile(p.rstrip("/")):
            raise VaralignError("output path exists and is not a directory", url)
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p.rstrip("/"), detail=False)] \
            if fs.isdir(p.rstrip("/")) else []
    except VaralignError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, url) from None


def move(sources: list[str], dests: list[str]) -> None:
    """Server-side copy of each object onto its new name (an object appears whole), then the sources removed."""
    if not sources:
        return
    fs, _ = filesystem(sources[0])
    src = [filesystem(u)[1] for u in sources]
    dst = [filesystem(u)[1] for u in dests]
    try:
        fs.copy(src, dst)
        fs.rm(src)
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, dests[0]) from None


def remove_tree(url: str) -> None:
    """Every object under the prefix `url` (a folder varalign made: its staging or work prefix)."""
    fs, p = filesystem(url)
    try:
        if fs.exists(p):
            fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, url) from None


def child_env(url: object) -> dict[str, str]:
    """Environment that gives a child process which opens `url` with plain fsspec (img2dataset) this
    process's storage options: fsspec's own `FSSPEC_<PROTOCOL>` configuration variable."""
    if not is_url(url) or not options():
        return {}
    scheme = str(url).split("://", 1)[0]
    opts = options()
    scoped = opts[scheme] if isinstance(opts.get(scheme), dict) else opts
    return {ENV: json.dumps(opts), f"FSSPEC_{scheme.upper()}": json.dumps(scoped)}


def put_file(local_path: str, url: str) -> None:
    """Upload a finished local file to `url` in one put: the object appears whole or not at all."""
    fs, p = filesystem(url)
    try:
        fs.put_file(local_path, p)
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, url) from None


def get_file(url: str, local_path: str) -> None:
    fs, p = filesystem(url)
    try:
        fs.get_file(p, local_path)
    except FileNotFoundError:
        raise VaralignError("not found", url) from None
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, url) from None


def remove(url: str) -> None:
    fs, p = filesystem(url)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise remote_error(exc, url) from None


def cache_dir(*parts: str) -> Path:
    """varalign's folder in this machine's cache, `$XDG_CACHE_HOME/varalign/...` (default ~/.cache): fetched
    inputs, the locks and work directories of outputs in a store, derived assets."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "varalign", *parts)


def fetch(url: str) -> str:
    """A small input (a target, a subset file, centroids) as a local file: downloaded once into
    `~/.cache/varalign/inputs/`, keyed by the URL and the object's ETag/size (a changed object is
    fetched again)."""
    import hashlib  # noqa: PLC0415

    fs, p = filesystem(url)
    fs.invalidate_cache(p)  # this process's listing may predate a change of the object (a long-lived API user)
    meta = info(url)
    base = cache_dir("inputs")
    by_url = base / hashlib.sha256(url.encode()).hexdigest()[:24]
    folder = by_url / hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    dest = folder / url.rstrip("/").rsplit("/", 1)[-1]
    if dest.is_file() and dest.stat().st_size == meta["size"]:
        return str(dest)
    folder.mkdir(parents=True, exist_ok=True)
    from .atomic import atomic_path  # noqa: PLC0415

    with atomic_path(dest) as tmp:
        get_file(url, str(tmp))
    # one copy per URL: the versions fetched before this one (folders this function made) go
    for old in by_url.iterdir():
        if old.is_dir() and not old.is_symlink() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return str(dest)


def localize(path: object) -> object:
    """`path` itself when local, else a fetched local copy (see `fetch`)."""
    return fetch(str(path)) if path is not None and is_url(path) else path


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
