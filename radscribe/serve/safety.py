"""What the API accepts: `image_url` parsing, the local-folder and host allow-lists, and size limits.

Safe by default: an image arrives as a `data:` URI (PNG, JPEG, WebP or DICOM as `application/dicom`). Local
files are read only from a folder the operator named (`--allow-folder`), and http(s) URLs are fetched only from
hosts the operator named (`--allow-host`); even then a host that resolves to a private, loopback, link-local
or otherwise non-public address is refused, the connection goes to the address that was checked (so a DNS
answer cannot change between the check and the fetch), redirects are not followed, and a fetch has a timeout
and a byte cap. Everything refused raises `RequestRejected`, which the API turns into an OpenAI-shaped 4xx.

Used by radscribe/serve/api.py; nothing here needs torch.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
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
                 code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


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
    """Connect and read timeout of one fetch."""


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
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
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


def check_pixels(data: bytes, policy: ImagePolicy, param: str = "image_url") -> tuple[int, int]:
    """Width and height from the header alone, refusing images over the pixel limit (decompression bombs)."""
    kind = sniff_kind(data, param)
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            width, height = int(ds.Columns), int(ds.Rows)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except Exception as err:  # pydicom raises many types for a broken header
            raise RequestRejected(f"{param}: unreadable DICOM header ({type(err).__name__})", param=param) from None
        pixels = width * height * frames
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                width, height = img.size
        except Image.DecompressionBombError:
            raise RequestRejected(f"{param}: the image has too many pixels", status=413, param=param,
                                  code="image_too_large") from None
        except Exception as err:
            raise RequestRejected(f"{param}: unreadable {kind} image ({type(err).__name__})", param=param) from None
        pixels = width * height
    if pixels > policy.max_pixels:
        raise RequestRejected(f"{param}: {width}x{height} is {pixels} pixels, over the limit of "
                              f"{policy.max_pixels}", status=413, param=param, code="image_too_large")
    return width, height


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
    root = policy.allow_folder.resolve()
    # Resolve symlinks and '..' first, then require the result to sit inside the allowed folder.
    target = (root / raw.lstrip("/")).resolve() if not Path(raw).is_absolute() else Path(raw).resolve()
    if ".." in Path(raw).parts or not target.is_relative_to(root):
        raise RequestRejected(f"{param}: {raw!r} is outside the allowed folder", status=403, param=param,
                              code="path_not_allowed")
    if not target.is_file():
        raise RequestRejected(f"{param}: no file {raw!r} in the allowed folder", status=404, param=param,
                              code="not_found")
    if target.stat().st_size > policy.max_image_bytes:
        raise _too_large(param, policy)
    return target.read_bytes()


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
    conn = _PinnedConnection(parts.scheme, host, ip, port, policy.fetch_timeout_s)
    try:
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            # Redirects are not followed: a redirect could point at an internal address.
            raise RequestRejected(f"{param}: fetching {url} gave HTTP {resp.status}", status=400, param=param,
                                  code="fetch_failed")
        data = resp.read(policy.max_image_bytes + 1)
    except (OSError, http.client.HTTPException) as err:
        raise RequestRejected(f"{param}: fetching {url} failed ({type(err).__name__})", status=400, param=param,
                              code="fetch_failed") from None
    finally:
        conn.close()
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
        if scheme == "https":
            context = ssl.create_default_context()
            self._conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
            sock = socket.create_connection((ip, port), timeout=timeout)
            self._conn.sock = context.wrap_socket(sock, server_hostname=host)
        else:
            self._conn = http.client.HTTPConnection(ip, port, timeout=timeout)

    def request(self, method: str, path: str, headers: dict) -> None:
        self._conn.request(method, path, headers=headers)

    def getresponse(self):
        return self._conn.getresponse()

    def close(self) -> None:
        self._conn.close()
