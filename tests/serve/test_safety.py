"""image_url parsing and the allow-lists, without a server (the API tests hit the same code over HTTP)."""

import base64
import io
import os
import socket
import time

import pytest
from PIL import Image

from radscribe.serve.safety import (ImagePolicy, RequestRejected, check_pixels, image_bytes, is_public_address,
                                    resolve_public)


def png_bytes(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def test_data_uri_round_trips_bytes_exactly():
    data = png_bytes()
    assert image_bytes(uri(data), ImagePolicy()) == data


def test_data_uri_refusals_name_the_problem():
    policy = ImagePolicy()
    with pytest.raises(RequestRejected, match="not accepted") as err:
        image_bytes(uri(png_bytes(), "image/svg+xml"), policy)
    assert err.value.status == 415
    with pytest.raises(RequestRejected, match="base64"):
        image_bytes("data:image/png;base64,@@@not-base64@@@", policy)
    with pytest.raises(RequestRejected, match="declared image/jpeg but the bytes are png"):
        image_bytes(uri(png_bytes(), "image/jpeg"), policy)
    with pytest.raises(RequestRejected, match="not a PNG, JPEG, WebP or DICOM"):
        image_bytes(uri(b"GIF89a" + b"\0" * 40, "image/png"), policy)
    with pytest.raises(RequestRejected, match="base64-encoded"):
        image_bytes("data:image/png,rawbytes", policy)


def test_oversized_payload_is_refused_before_decoding():
    policy = ImagePolicy(max_image_bytes=100)
    with pytest.raises(RequestRejected) as err:
        image_bytes(uri(png_bytes((64, 64)) + b"\0" * 200), policy)
    assert err.value.status == 413


def test_pixel_limit_reads_only_the_header():
    policy = ImagePolicy(max_pixels=100 * 100)
    assert check_pixels(png_bytes((100, 100)), policy) == (100, 100, 1)
    with pytest.raises(RequestRejected, match="101x100 is 10100 pixels") as err:
        check_pixels(png_bytes((101, 100)), policy)
    assert err.value.status == 413


def test_dicom_pixel_limit_from_its_header():
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm", download=False), "rb").read()
    assert image_bytes(uri(data, "application/dicom"), ImagePolicy()) == data
    assert check_pixels(data, ImagePolicy()) == (128, 128, 1)
    with pytest.raises(RequestRejected, match="128x128"):
        check_pixels(data, ImagePolicy(max_pixels=64 * 64))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "../../etc/passwd", "images/x.png"])
def test_local_files_are_off_by_default(url):
    with pytest.raises(RequestRejected, match="local file reads are disabled") as err:
        image_bytes(url, ImagePolicy())
    assert err.value.status == 403


def test_allowed_folder_reads_inside_and_refuses_traversal(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    policy = ImagePolicy(allow_folder=allowed)
    assert image_bytes("a.png", policy) == png_bytes()
    assert image_bytes(f"file://{allowed}/a.png", policy) == png_bytes()
    for bad in ["../secret.png", f"file://{allowed}/../secret.png", "file:///etc/passwd", "link.png",
                "%2e%2e/secret.png", f"file://{tmp_path}/secret.png", "file://otherhost/a.png"]:
        with pytest.raises(RequestRejected) as err:
            image_bytes(bad, policy)
        assert err.value.status == 403, bad


def test_fetches_are_off_by_default_and_need_the_allow_list():
    with pytest.raises(RequestRejected, match="fetching image URLs is disabled"):
        image_bytes("http://example.com/a.png", ImagePolicy())
    with pytest.raises(RequestRejected, match="not in the allow-list"):
        image_bytes("https://evil.example/a.png", ImagePolicy(allow_hosts=["example.com"]))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]",
                                  "0.0.0.0", "[::ffff:127.0.0.1]", "100.64.0.1"])
def test_allowed_hosts_that_are_private_or_loopback_are_refused(host):
    name = host.strip("[]")
    policy = ImagePolicy(allow_hosts=[name])
    with pytest.raises(RequestRejected, match="non-public address") as err:
        image_bytes(f"http://{host}:8000/a.png", policy)
    assert err.value.status == 403


def test_every_resolved_address_must_be_public(monkeypatch):
    # A name with one public and one private answer (DNS rebinding setups) is refused as a whole.
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(RequestRejected, match="10.0.0.5"):
        resolve_public("mixed.example", 80)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers[:1])
    assert resolve_public("public.example", 80) == "93.184.215.14"


def test_public_address_classification():
    assert is_public_address("93.184.215.14") and is_public_address("2606:4700::1111")
    for ip in ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "::1", "fe80::1",
               "fc00::1", "::ffff:10.0.0.1", "224.0.0.1", "0.0.0.0", "100.64.0.1"]:
        assert not is_public_address(ip), ip


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x", "javascript:alert(1)"])
def test_other_schemes_are_refused(url):
    with pytest.raises(RequestRejected, match="not supported"):
        image_bytes(url, ImagePolicy())


def test_allow_listed_fetch_pins_the_checked_address_caps_bytes_and_refuses_redirects(monkeypatch):
    # Loopback stands in for a public host here: the address check is bypassed for this test only, so the
    # fetch path itself (pinned connection, Host header, status, byte cap, timeout) runs against a local server.
    import http.server
    import threading
    import time

    from radscribe.serve import safety

    image = png_bytes((9, 7))
    seen_hosts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen_hosts.append(self.headers["Host"])
            if self.path == "/slow.png":
                time.sleep(1.0)
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest")
                self.end_headers()
                return
            body = image + (b"\0" * 5000 if self.path == "/big.png" else b"")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.setattr(safety, "is_public_address", lambda ip: True)
    policy = ImagePolicy(allow_hosts=["localhost"], max_image_bytes=len(image) + 100, fetch_timeout_s=0.3)
    try:
        assert image_bytes(f"http://localhost:{port}/ok.png", policy) == image
        assert seen_hosts[-1] == f"localhost:{port}"
        with pytest.raises(RequestRejected) as err:
            image_bytes(f"http://localhost:{port}/big.png", policy)
        assert err.value.status == 413
        with pytest.raises(RequestRejected, match="HTTP 302"):
            image_bytes(f"http://localhost:{port}/moved.png", policy)
        with pytest.raises(RequestRejected, match="took longer than 0.3 s") as err:
            image_bytes(f"http://localhost:{port}/slow.png", policy)
        assert err.value.code == "fetch_timeout"
    finally:
        server.shutdown()


def test_the_fetch_deadline_covers_the_whole_transfer_not_each_read(monkeypatch):
    # A server that sends one byte every 0.2 s never lets a 1 s *per-read* timeout expire; the 1 s deadline
    # for the whole fetch must still end it, long before the 40 bytes (8 s) would have trickled in.
    import threading

    from radscribe.serve import safety

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        conn.recv(4096)
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"x" * 30
        for byte in reply:
            if stop.wait(0.2):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    monkeypatch.setattr(safety, "is_public_address", lambda ip: True)
    policy = ImagePolicy(allow_hosts=["localhost"], fetch_timeout_s=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(RequestRejected, match="took longer than 1 s"):
            image_bytes(f"http://localhost:{listener.getsockname()[1]}/slow.png", policy)
        assert time.monotonic() - started < 4.0  # the trickle needs ~8 s; the deadline ended it
    finally:
        stop.set()
        listener.close()


def test_allowed_folder_refuses_nul_links_fifos_and_non_files(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(png_bytes())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.png").write_bytes(png_bytes((9, 9)))
    (allowed / "linked").symlink_to(tmp_path / "outside")
    (allowed / "inner-link.png").symlink_to(allowed / "sub" / "a.png")  # even a link that stays inside
    os.mkfifo(allowed / "pipe.png")
    policy = ImagePolicy(allow_folder=allowed)
    assert image_bytes("sub/a.png", policy) == png_bytes()
    assert image_bytes(f"file://{allowed}/sub/./a.png", policy) == png_bytes()
    cases = {"sub/a.png\x00.txt": (400, "NUL"), "%00": (400, "NUL"), "linked/a.png": (403, "symbolic link"),
             "inner-link.png": (403, "symbolic link"), "pipe.png": (404, "not a regular file"),
             "sub": (404, "not a regular file"), "sub/none.png": (404, "no file"),
             "sub/a.png/x": (404, "no file"), "": (400, "non-empty")}
    for url, (status, marker) in cases.items():
        with pytest.raises(RequestRejected, match=marker) as err:
            image_bytes(url, policy)
        assert err.value.status == status, url


def test_a_folder_swapped_for_a_link_mid_request_never_leaks_a_file(tmp_path):
    # The race of resolve-then-open: a thread keeps swapping allowed/sub between a real folder and a link to a
    # folder outside, while requests read sub/x.png. Opening component by component without following links
    # must never return the outside file, however the swaps interleave.
    import threading

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    inside_bytes, secret_bytes = png_bytes((5, 5)), png_bytes((7, 7))
    (allowed / "sub" / "x.png").write_bytes(inside_bytes)
    (outside / "x.png").write_bytes(secret_bytes)
    sub, parked = allowed / "sub", allowed / "parked"
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            os.rename(sub, parked)
            os.symlink(outside, sub)
            os.unlink(sub)
            os.rename(parked, sub)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes = {"inside": 0, "link": 0, "missing": 0}
    policy = ImagePolicy(allow_folder=allowed)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline or not (outcomes["inside"] and outcomes["link"]):
            try:
                data = image_bytes("sub/x.png", policy)
            except RequestRejected as err:
                outcomes["link" if "symbolic link" in str(err) else "missing"] += 1
                continue
            assert data != secret_bytes, "a file outside the allowed folder was served"
            assert data == inside_bytes
            outcomes["inside"] += 1
            if time.monotonic() > deadline + 30:
                break
    finally:
        stop.set()
        thread.join()
    assert outcomes["inside"] and outcomes["link"], outcomes  # the race really ran both ways
