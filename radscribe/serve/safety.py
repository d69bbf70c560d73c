"""What the API accepts: `image_url` parsing, the local-folder and host allow-lists, and size limits.

Safe by default: an image arrives as a `data:` URI (PNG, JPEG, WebP or DICOM as `application/dicom`). Local
files are read only from a folder the operator named (`--allow-folder`), opened one path component at a time
relative to the folder's handle without following any symbolic link (so swapping a folder for a link between a
check and the open cannot lead outside); http(s) URLs are fetched only from hosts the operator named
(`--allow-host`); even then a host that resolves to a private, loopback, link-local or otherwise non-public
address is refused, the connection goes to the address that was checked (so a DNS answer cannot change between
the check and the fetch), redirects are not followed, and a fetch has one deadline for the whole transfer and a
byte cap. Everything refused raises `RequestRejected`, which the API turns into an OpenAI-shaped 4xx.

Used by radscribe/serve/api.py; nothing here needs torch.
"""

from __future__ import annotations

import binascii
import errno
import http.client
import io
import ipaddress
import os
import secrets
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from radscribe.errors import RadscribeError

# The kinds we decode, by the magic bytes that open the file. DICOM Part 10 files carry "DICM" at offset 128.
MEDIA_TYPES = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
    "application/dicom": "dicom",
}


class RequestRejected(RadscribeError):
    """A request the API refuses; `status` is the HTTP code, `param` the offending field (OpenAI error shape)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers


@dataclass
class ImagePolicy:
    """Where images may come from and how large they may be."""

    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image (after base64 decoding, or as fetched)."""
    max_pixels: int = 4096 * 4096
    """Largest width x height, checked from the header before any pixel is decoded."""
    allow_folder: Path | None = None
    """Local folder that `file://` URLs and plain paths may read from; None = no local reads at all."""
    allow_hosts: list[str] = field(default_factory=list)
    """Host names http(s) URLs may be fetched from; empty = no outbound fetches at all."""
    fetch_timeout_s: float = 10.0
    """Deadline of one whole fetch (connect, headers and body together), however slowly the server trickles."""


def image_bytes(url: str, policy: ImagePolicy, param: str = "image_url") -> bytes:
    """An `image_url.url` value -> the encoded image bytes, or RequestRejected naming why."""
    if not isinstance(url, str) or not url:
        raise RequestRejected(f"{param} must be a non-empty string", param=param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _data_uri_bytes(url, policy, param)
    elif scheme in ("http", "https"):
        data = _fetch(url, policy, param)
    elif scheme == "file" or not scheme:
        data = _local_file(url, policy, param)
    else:
        raise RequestRejected(f"{param}: URL scheme {scheme!r} is not supported; send a data: URI", param=param)
    sniff_kind(data, param)
    return data


def _data_uri_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise RequestRejected(f"{param}: a data URI needs a ',' between its header and its payload", param=param)
    parts = [p.strip().lower() for p in header[len("data:"):].split(";")]
    media_type, is_base64 = parts[0], "base64" in parts[1:]
    if media_type not in MEDIA_TYPES:
        raise RequestRejected(f"{param}: media type {media_type or '(none)'!r} is not accepted; use one of "
                              f"{', '.join(sorted(MEDIA_TYPES))}", status=415, param=param,
                              code="unsupported_media_type")
    if not is_base64:
        raise RequestRejected(f"{param}: data URIs must be base64-encoded (data:{media_type};base64,...)",
                              param=param)
    # base64 is 4/3 of the bytes: refuse before decoding anything oversized.
    if len(payload) > policy.max_image_bytes * 4 // 3 + 4:
        raise _too_large(param, policy)
    try:
        # strict_mode: the C decoder refuses any non-alphabet byte itself (b64decode(validate=True) runs a regex
        # over the whole payload first, several times slower on a 16 MB body). It takes the ASCII str as it is:
        # no 16 MB copy as bytes first (a non-ASCII character is its ValueError).
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise RequestRejected(f"{param}: the base64 payload is malformed", param=param) from None
    if len(data) > policy.max_image_bytes:
        raise _too_large(param, policy)
    kind = sniff_kind(data, param)
    if kind != MEDIA_TYPES[media_type]:
        raise RequestRejected(f"{param}: declared {media_type} but the bytes are {kind}", param=param)
    return data


def _too_large(param: str, policy: ImagePolicy) -> RequestRejected:
    return RequestRejected(f"{param}: the image is larger than {policy.max_image_bytes} bytes", status=413,
                           param=param, code="image_too_large")


def sniff_kind(data: bytes, param: str = "image_url") -> str:
    """Magic bytes -> png | jpeg | webp | dicom; anything else is refused."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[128:132] == b"DICM":
        return "dicom"
    raise RequestRejected(f"{param}: the bytes are not a PNG, JPEG, WebP or DICOM file", status=415, param=param,
                          code="unsupported_media_type")


class ImageHeader(NamedTuple):
    """What an image's header says, read before any pixel is decoded."""

    width: int
    height: int
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


def check_pixels(data: bytes, policy: ImagePolicy, param: str = "image_url") -> ImageHeader:
    """Width, height (and DICOM frames) from the header alone, refusing images over the pixel limit (bombs)."""
    from radscribe.data.imaging import DecodeLimitError, dicom_shape, read_dicom

    kind = sniff_kind(data, param)
    if kind == "dicom":
        try:
            # The one DICOM reader: a deflated header is inflated within its own bound, never the pixel data.
            ds = read_dicom(data, header_only=True)
            frames, rows, columns, samples = dicom_shape(ds, param)
        except DecodeLimitError as err:
            raise RequestRejected(f"{param}: {_without_label(err)}", status=413, param=param,
                                  code="image_too_large") from None
        except RadscribeError as err:
            raise RequestRejected(f"{param}: {_without_label(err)}", param=param) from None
        if samples not in (1, 3):
            raise RequestRejected(f"{param}: DICOM SamplesPerPixel {samples} is not 1 or 3", param=param)
        header = ImageHeader(columns, rows, max(frames, 1))
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                header = ImageHeader(*img.size)
        except Image.DecompressionBombError:
            raise RequestRejected(f"{param}: the image has too many pixels", status=413, param=param,
                                  code="image_too_large") from None
        except Exception as err:
            raise RequestRejected(f"{param}: unreadable {kind} image ({type(err).__name__})", param=param) from None
    frames = f" x {header.frames} frames" if header.frames > 1 else ""
    if header.width < 1 or header.height < 1:
        raise RequestRejected(f"{param}: the image is {header.width}x{header.height} pixels", param=param)
    if header.pixels > policy.max_pixels:
        raise RequestRejected(f"{param}: {header.width}x{header.height}{frames} is {header.pixels} pixels, over "
                              f"the limit of {policy.max_pixels}", status=413, param=param, code="image_too_large")
    return header


def _without_label(err: Exception) -> str:
    # imaging errors open with the source's label ("<123 bytes>: ..."); the API names the field instead.
    text = str(err)
    return text.split(": ", 1)[1] if text.startswith("<") and ": " in text else text


def _local_file(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.allow_folder is None:
        raise RequestRejected(f"{param}: local file reads are disabled; send the image as a data: URI "
                              "(the server operator can allow one folder with --allow-folder)", status=403,
                              param=param, code="local_files_disabled")
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestRejected(f"{param}: file URLs naming a host are not accepted", status=403, param=param,
                                  code="path_not_allowed")
        raw = unquote(parts.path)
    else:
        raw = unquote(url)
    if "\0" in raw:
        raise RequestRejected(f"{param}: the path holds a NUL character", param=param, code="invalid_path")
    return _read_beneath(Path(policy.allow_folder), _relative_parts(raw, Path(policy.allow_folder), param),
                         raw, policy, param)


def _relative_parts(raw: str, root: Path, param: str) -> list[str]:
    """The path's components below `root` (absolute paths must name a place inside it), '..' refused."""
    path = PurePosixPath(raw)
    if path.is_absolute():
        for base in {PurePosixPath(os.path.abspath(root)), PurePosixPath(os.path.realpath(root))}:
            if path.is_relative_to(base):
                path = path.relative_to(base)
                break
        else:
            raise RequestRejected(f"{param}: {raw!r} is outside the allowed folder", status=403, param=param,
                                  code="path_not_allowed")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts or not parts:
        raise RequestRejected(f"{param}: {raw!r} is outside the allowed folder", status=403, param=param,
                              code="path_not_allowed")
    return parts


def _read_beneath(root: Path, parts: list[str], raw: str, policy: ImagePolicy, param: str) -> bytes:
    """Open root/parts one component at a time relative to the previous handle, following no symbolic link.

    Each `os.open(..., dir_fd=..., O_NOFOLLOW)` acts on the directory already opened, so no rename or link
    swapped in after a check can move the open outside the folder (the race of resolve-then-open).
    """
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    handle = None
    try:
        for depth, name in enumerate(parts):
            last = depth == len(parts) - 1
            try:
                # O_NONBLOCK: opening a FIFO must not hang the server; it is refused below as not a regular file.
                fd = os.open(name, nofollow | (os.O_NONBLOCK if last else os.O_DIRECTORY), dir_fd=folder)
            except OSError as err:
                raise _path_refusal(err, name, folder, raw, param) from None
            if last:
                handle = fd
            else:
                os.close(folder)
                folder = fd
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise RequestRejected(f"{param}: {raw!r} is not a regular file", status=404, param=param,
                                  code="not_found")
        if info.st_size > policy.max_image_bytes:
            raise _too_large(param, policy)
        with os.fdopen(handle, "rb") as f:
            handle = None
            data = f.read(policy.max_image_bytes + 1)
    finally:
        os.close(folder)
        if handle is not None:
            os.close(handle)
    if len(data) > policy.max_image_bytes:
        raise _too_large(param, policy)
    return data


def _path_refusal(err: OSError, name: str, folder: int, raw: str, param: str) -> RequestRejected:
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link or err.errno == errno.ELOOP:
        return RequestRejected(f"{param}: {raw!r} goes through a symbolic link ({name!r}); links are not "
                               "followed in the allowed folder", status=403, param=param, code="path_not_allowed")
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return RequestRejected(f"{param}: no file {raw!r} in the allowed folder", status=404, param=param,
                               code="not_found")
    return RequestRejected(f"{param}: cannot open {raw!r} ({err.strerror})", status=403, param=param,
                           code="path_not_allowed")


def is_public_address(ip: str) -> bool:
    """True only for globally routable unicast addresses (no private, loopback, link-local, reserved, ...)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (addr.is_multicast or addr.is_loopback or addr.is_link_local
                                   or addr.is_private or addr.is_reserved or addr.is_unspecified)


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not policy.allow_hosts:
        raise RequestRejected(f"{param}: fetching image URLs is disabled; send the image as a data: URI "
                              "(the server operator can allow hosts with --allow-host)", status=403,
                              param=param, code="fetch_disabled")
    if host not in {h.lower() for h in policy.allow_hosts}:
        raise RequestRejected(f"{param}: host {host!r} is not in the allow-list", status=403, param=param,
                              code="host_not_allowed")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RequestRejected(f"{param}: malformed port in the URL", param=param) from None
    ip = resolve_public(host, port, param)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + policy.fetch_timeout_s
    conn = None
    try:
        conn = _PinnedConnection(parts.scheme, host, ip, port, policy.fetch_timeout_s)
        # One deadline for the whole transfer: socket timeouts bound each read, not a server that sends one
        # byte just before each of them would expire, so a watchdog shuts the socket at the deadline.
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), conn.abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status != 200:
                # Redirects are not followed: a redirect could point at an internal address.
                raise RequestRejected(f"{param}: fetching {url} gave HTTP {resp.status}", status=400, param=param,
                                      code="fetch_failed")
            data = resp.read(policy.max_image_bytes + 1)
        finally:
            watchdog.cancel()
    except (OSError, http.client.HTTPException, ValueError) as err:
        if time.monotonic() >= deadline or (conn is not None and conn.aborted):
            raise RequestRejected(f"{param}: fetching {url} took longer than {policy.fetch_timeout_s:g} s",
                                  status=400, param=param, code="fetch_timeout") from None
        raise RequestRejected(f"{param}: fetching {url} failed ({type(err).__name__})", status=400, param=param,
                              code="fetch_failed") from None
    finally:
        if conn is not None:
            conn.close()
    if conn.aborted:
        raise RequestRejected(f"{param}: fetching {url} took longer than {policy.fetch_timeout_s:g} s",
                              status=400, param=param, code="fetch_timeout")
    if len(data) > policy.max_image_bytes:
        raise _too_large(param, policy)
    return data


def resolve_public(host: str, port: int, param: str = "image_url") -> str:
    """Resolve `host`; every address it resolves to must be public. Returns the first one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise RequestRejected(f"{param}: host {host!r} does not resolve", param=param, code="fetch_failed") from None
    addresses = [info[4][0] for info in infos]
    blocked = [a for a in addresses if not is_public_address(a)]
    if blocked or not addresses:
        raise RequestRejected(f"{param}: host {host!r} resolves to a non-public address ({blocked[0] if blocked else 'none'})",
                              status=403, param=param, code="host_not_allowed")
    return addresses[0]


class _PinnedConnection:
    """An HTTP(S) connection to an address already checked, still naming the host for TLS and `Host:`."""

    def __init__(self, scheme: str, host: str, ip: str, port: int, timeout: float):
        self.aborted = False
        sock = socket.create_connection((ip, port), timeout=timeout)
        if scheme == "https":
            context = ssl.create_default_context()
            self._conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
            sock = context.wrap_socket(sock, server_hostname=host)
        else:
            self._conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        self._conn.sock = sock

    def request(self, method: str, path: str, headers: dict) -> None:
        self._conn.request(method, path, headers=headers)

    def getresponse(self):
        return self._conn.getresponse()

    def abort(self) -> None:
        """Called at the deadline from the watchdog thread: wakes any blocked read with an error."""
        self.aborted = True
        try:
            socket.socket.shutdown(self._conn.sock, socket.SHUT_RDWR)
        except (OSError, AttributeError, TypeError):
            pass

    def close(self) -> None:
        self._conn.close()


# --- the HTTP layer: who may talk to the server, and how long they may take -----------------------------------
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    # The page loads only its own script, style and images (previews are blob: URLs) and talks only to its
    # own origin; nothing may frame it (clickjacking) and no response is sniffed into another type.
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                 b"img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                                 b"form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def host_name(value: str) -> str:
    """The host part of a Host header, an Origin or an `--allow-origin` value, lower case, no port, no dot."""
    value = value.strip().lower()
    if "://" in value:
        value = urlsplit(value).netloc
    value = value.rsplit("@", 1)[-1]
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HttpGuard:
    """Pure ASGI middleware in front of the app: Host allow-list, cross-origin and non-JSON POSTs refused, the API
    key, a cap on requests in flight, and security headers on every response (`Cache-Control: no-store` on all but the
    page's static files).

    DNS rebinding: a browser tricked into calling 127.0.0.1 under an attacker's name still sends that name as
    `Host`, so only the names we serve under are accepted. CSRF: a cross-site form or `text/plain` fetch can
    POST without a CORS preflight, an `application/json` one cannot, so POSTs must be JSON, and an `Origin` that
    names another site is refused outright.
    """

    def __init__(self, app, allowed_hosts, max_in_flight: int, error, api_key: str | None = None,
                 exempt_paths=("/health",)):
        self.app = app
        self.api_key = api_key
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.error = error  # (status, message, code, headers) -> a Starlette response
        self.exempt = set(exempt_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, self._with_headers(scope, send))
        counted = scope["path"] not in self.exempt
        if counted and self.in_flight >= self.max_in_flight:
            response = self.error(503, f"the server is handling {self.in_flight} requests, its limit; retry shortly",
                                  "server_busy", {"Retry-After": "1"})
            return await response(scope, receive, self._with_headers(scope, send))
        self.in_flight += counted
        try:
            await self.app(scope, receive, self._with_headers(scope, send))
        finally:
            self.in_flight -= counted

    def _refusal(self, scope, headers: dict):
        host = headers.get("host")
        if not host or host_name(host) not in self.allowed:
            return self.error(400, f"Host {host!r} is not one this server answers to; the operator can add "
                                   "names with --allow-origin", "host_not_allowed", None)
        origin = headers.get("origin")
        if origin is not None and host_name(origin) not in self.allowed:
            return self.error(403, f"cross-origin request from {origin!r} refused", "origin_not_allowed", None)
        if self.api_key and scope["path"].startswith("/v1/"):
            # The web page and /health are open; the model endpoints need the key when one is set.
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return self.error(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                  "invalid_api_key", None)
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return self.error(415, f"POST bodies must be application/json, not {kind or 'untyped'}",
                                  "unsupported_media_type", None)
        return None

    @staticmethod
    def _with_headers(scope, send):
        static = scope["path"].startswith("/web/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [h for h in SECURITY_HEADERS if h[0] not in names]
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                      if k.lower() != b"cache-control"] + extra}
                else:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_headers


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline on each request's headers (uvicorn has none, so a client sending a
    header byte every few seconds would hold its connection forever). Passed as `uvicorn.Config(http=...)`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11Protocol(H11Protocol):
        _deadline = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None and self._waiting_for_headers():
                self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()  # the first bytes of a next request on a kept-alive connection start its deadline
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # uvicorn's own keep-alive timeout covers the idle connection from here
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11Protocol
