"""Local servers for `varalign download`'s tests and benchmark: images with injected faults, and a Hub.

Both bind to 127.0.0.1 only, on a free port, serve from a daemon thread, and stop by themselves after
`max_seconds` (or on `close()`). Every wait inside a handler is bounded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np


@dataclass
class Route:
    """What one path answers. `fault`: ok, 404, 500_once (500 then 200), slow (`delay` s before the
    headers), redirect (302 to `target`), close (drop the connection without an answer), gate (send the
    body one byte every 0.1 s, so no client timeout fires, until `LocalServer.gate` is set, at most
    `delay` s)."""

    body: bytes = b""
    fault: str = "ok"
    content_type: str = "image/jpeg"
    delay: float = 0.0
    target: str = ""
    headers: dict = field(default_factory=dict)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 answering from a `{path: Route}` table; counts requests per path."""

    def __init__(self, routes: dict[str, Route] | None = None, max_seconds: float = 600.0) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.requests: Counter = Counter()
        self.bytes_sent = 0  # response bodies written, all paths
        self.gate = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(max_seconds, self.close)
        self._timer.daemon = True
        self._timer.start()

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests[path] += 1
            seen = self.requests[path]
        route = self.routes.get(path)
        if route is None:
            return _send(handler, 404, b"not found", "text/plain", head)
        if route.fault == "404":
            return _send(handler, 404, b"gone", "text/plain", head)
        if route.fault == "500_once" and seen == 1:
            return _send(handler, 500, b"try later", "text/plain", head)
        if route.fault == "slow":
            self._stop.wait(route.delay)
        if route.fault == "gate":
            return _trickle(handler, route.body, self.gate, route.delay)
        if route.fault == "close":
            handler.close_connection = True
            return None
        if route.fault == "redirect":
            return _send(handler, 302, b"", "text/plain", head, {"Location": route.target})
        sent = _send(handler, 200, route.body, route.content_type, head, route.headers, handler.headers.get("Range"))
        with self._lock:
            self.bytes_sent += sent
        return None

    def close(self) -> None:
        """Stop serving (idempotent); releases every waiting handler."""
        self._stop.set()
        self.gate.set()
        self._timer.cancel()
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            server.answer(self, head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            server.answer(self, head=True)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str, head: bool,
          headers: dict | None = None, byte_range: str | None = None) -> int:
    """Answer; returns the body bytes written."""
    start, end = 0, len(body)
    if byte_range and code == 200 and byte_range.startswith("bytes="):
        first, _, last = byte_range[6:].partition("-")
        start, end = int(first or 0), (int(last) + 1 if last else len(body))
        code = 206
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(end - start))
        if code == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(body[start:end])
            return end - start
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to do
        pass
    return 0


def _trickle(handler: BaseHTTPRequestHandler, body: bytes, gate: threading.Event, limit: float) -> None:
    deadline = time.monotonic() + limit
    try:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        sent = 0
        while sent < len(body) - 1 and not gate.is_set() and time.monotonic() < deadline:
            handler.wfile.write(body[sent:sent + 1])
            handler.wfile.flush()
            sent += 1
            gate.wait(0.1)
        handler.wfile.write(body[sent:])
    except (BrokenPipeError, ConnectionResetError):
        pass


# -- a Hugging Face Hub endpoint (HF_ENDPOINT) for one dataset repo ------------------------------------
def add_hub_repo(server: LocalServer, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
    """Serve `files` as the dataset repo `repo_id` the way the Hub's HTTP API does (repo info, recursive
    tree listing, `resolve` downloads with commit and etag headers); returns the commit sha."""
    commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
    entries = []
    for path, data in sorted(files.items()):
        sha = hashlib.sha256(data).hexdigest()
        entries.append({"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                        "lfs": {"oid": sha, "size": len(data), "pointerSize": 134}})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
        for rev in {revision, commit}:
            server.routes[f"/datasets/{repo_id}/resolve/{rev}/{path}"] = Route(
                data, content_type="application/octet-stream", headers=headers)
    info = {"id": repo_id, "sha": commit, "private": False, "gated": False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "siblings": [{"rfilename": e["path"]} for e in entries],
            "lastModified": "2023-04-01T00:00:00.000Z", "author": repo_id.split("/")[0]}
    folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
    tree = [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders] + entries
    for rev in {revision, commit}:
        server.routes[f"/api/datasets/{repo_id}/revision/{rev}"] = _json_route(info)
        server.routes[f"/api/datasets/{repo_id}/tree/{rev}"] = _json_route(tree)
    return commit


def _json_route(obj: object) -> Route:
    return Route(json.dumps(obj).encode(), content_type="application/json")


# -- a small image pool ------------------------------------------------------------------------------
def digit_images(n: int, size: int = 96, seed: int = 0, noise: float = 0.0) -> list[np.ndarray]:
    """`n` real images: scikit-learn's handwritten digits (8x8, shipped in its wheel), upscaled to
    `size` px with a random aspect ratio and colour tint, as HxWx3 uint8 BGR arrays; `noise` adds
    Gaussian grain of that standard deviation (so that JPEG sizes look more like photos')."""
    import cv2  # noqa: PLC0415 - comes with img2dataset ([download])
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gray = (digits[i % len(digits)] * (255.0 / 16.0)).astype(np.uint8)
        h = int(size * rng.uniform(0.6, 1.0))
        img = cv2.resize(gray, (size, h), interpolation=cv2.INTER_LINEAR)
        tint = rng.uniform(0.5, 1.0, 3)
        pixels = img[:, :, None] * tint[None, None, :]
        if noise:
            pixels = pixels + rng.normal(0.0, noise, pixels.shape)
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return out


def encode(img: np.ndarray, fmt: str = ".jpg") -> bytes:
    import cv2  # noqa: PLC0415

    ok, buf = cv2.imencode(fmt, img)
    if not ok:
        raise RuntimeError(f"cannot encode {fmt}")
    return buf.tobytes()


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:  # noqa: ANN001
    """Poll `predicate` until it is true or `timeout` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def image_pool(server: LocalServer, images: list[bytes], faults: dict[int, str] | None = None, *,
               faces: dict[int, list[list[float]]] | None = None, seed: int = 0, delay: float = 3.0) -> dict:
    """Serve `images` from `server` (row i at `/img/{i}.jpg`, with `faults[i]` injected) and return the
    DataComp metadata columns of the pool (uid, url, text, sizes, face_bboxes, sha256, CLIP scores).

    Faults: the `Route` ones, plus `hash` (served bytes differ from the metadata's sha256: another
    image) and `not_image` (HTML whose sha256 the metadata records). A `redirect` row points to
    `/moved/{i}.jpg`, which serves the image.
    """
    import cv2  # noqa: PLC0415

    faults, faces = dict(faults or {}), dict(faces or {})
    rng = np.random.default_rng(seed)
    uids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (len(images), 2), dtype=np.uint64)]
    cols: dict[str, list] = {k: [] for k in ("uid", "url", "text", "original_width", "original_height",
                                             "face_bboxes", "sha256", "clip_b32_similarity_score",
                                             "clip_l14_similarity_score")}
    for i, body in enumerate(images):
        fault = faults.get(i, "ok")
        path = f"/img/{i}.jpg"
        served = body
        if fault == "hash":
            served = images[(i + 1) % len(images)]
        elif fault == "not_image":
            body = served = b"<html><body>this page moved</body></html>"
        route = Route(served, fault=fault if fault not in ("hash", "not_image") else "ok", delay=delay,
                      content_type="text/html" if fault == "not_image" else "image/jpeg")
        if fault == "redirect":
            route.target = f"/moved/{i}.jpg"
            server.routes[route.target] = Route(served)
        server.routes[path] = route
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) if fault != "not_image" else None
        h, w = img.shape[:2] if img is not None else (64, 64)
        cols["uid"].append(uids[i])
        cols["url"].append(server.url + path)
        cols["text"].append(f"a photo of the digit number {i % 10}")
        cols["original_width"].append(w)
        cols["original_height"].append(h)
        cols["face_bboxes"].append(faces.get(i, []))
        cols["sha256"].append(hashlib.sha256(body).hexdigest())
        cols["clip_b32_similarity_score"].append(float(rng.uniform(0.1, 0.4)))
        cols["clip_l14_similarity_score"].append(float(rng.uniform(0.1, 0.4)))
    return cols


def write_metadata(columns: dict, out_dir: str, rows_per_file: int) -> list[str]:
    """Write pool columns as DataComp-style metadata parquets (`{i:08d}.parquet`) of `rows_per_file` rows."""
    import os  # noqa: PLC0415

    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
                        ("original_width", pa.int64()), ("original_height", pa.int64()),
                        ("clip_b32_similarity_score", pa.float32()), ("clip_l14_similarity_score", pa.float32()),
                        ("face_bboxes", pa.list_(pa.list_(pa.float64()))), ("sha256", pa.string())])
    table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, table.num_rows, rows_per_file)):
        paths.append(os.path.join(out_dir, f"{k:08d}.parquet"))
        pq.write_table(table.slice(start, rows_per_file), paths[-1])
    return paths
