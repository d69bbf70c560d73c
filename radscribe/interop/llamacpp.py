"""llama.cpp's own tools, found or built once: llama-server, llama-mtmd-cli, llama-quantize and the converters.

Run as: radscribe llamacpp install [--jobs N] [--sdist FILE]      (or: radscribe llamacpp path)

radscribe never converts or quantises a GGUF itself: it runs llama.cpp's `convert_hf_to_gguf.py`,
`convert_lora_to_gguf.py` and `llama-quantize`. The pinned llama.cpp is the one vendored in the
`llama-cpp-python` source distribution on PyPI (LLAMA_CPP_PYTHON below), so installing it needs only the
package registry: `pip download` fetches the sdist, its `vendor/llama.cpp` is extracted into the cache
(`~/.cache/radscribe/llama.cpp-<version>/`, or under $RADSCRIBE_CACHE) and the three targets are built with the
system cmake and C++ compiler. A second install is a no-op. Users with their own llama.cpp build point
$RADSCRIBE_LLAMACPP at its source folder (the one holding convert_hf_to_gguf.py, binaries in build/bin/).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from radscribe.errors import RadscribeError

LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp we build and test against."""
TARGETS = ("llama-server", "llama-mtmd-cli", "llama-quantize")
ENV_VAR = "RADSCRIBE_LLAMACPP"
_MARKER = "radscribe-build.json"
# Offline and lean: no HTTPS client, no web UI download from the HF bucket at build time, no tests/examples.
# Static libraries: the binaries carry no rpath into the temporary build folder, so the build can be renamed into
# place (and a cache folder moved) without "cannot open shared object file".
_CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp source folder (converters, gguf-py) with the built tools in `bin`."""

    root: Path
    bin: Path

    def tool(self, name: str) -> Path:
        path = self.bin / name
        if not path.is_file():
            raise RadscribeError(f"{path} is missing: rebuild with `radscribe llamacpp install --force`")
        return path

    @property
    def convert_hf(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def convert_lora(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"


def cache_dir() -> Path:
    """Where radscribe keeps built tools: $RADSCRIBE_CACHE, else $XDG_CACHE_HOME/radscribe, else ~/.cache/radscribe."""
    if os.environ.get("RADSCRIBE_CACHE"):
        return Path(os.environ["RADSCRIBE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "radscribe"


def install_dir() -> Path:
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def find() -> LlamaCpp:
    """The llama.cpp to use: $RADSCRIBE_LLAMACPP when set, else the cached build; an error says how to get one."""
    if os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser()
        tools = LlamaCpp(root, root / "build" / "bin")
        missing = [p for p in [tools.convert_hf, tools.convert_lora, *(tools.bin / t for t in TARGETS)]
                   if not p.is_file()]
        if missing:
            raise RadscribeError(f"${ENV_VAR}={root}: {missing[0]} is missing; point it at a llama.cpp source "
                                 f"folder built with `cmake --build build --target {' '.join(TARGETS)}`")
        return tools
    tools = _installed()
    if tools is None:
        raise RadscribeError(f"llama.cpp is not installed: run `radscribe llamacpp install` (builds llama.cpp "
                             f"{LLAMA_CPP_PYTHON} from PyPI into {install_dir()}) or set ${ENV_VAR}")
    return tools


def llama_server() -> Path:
    """Path of the `llama-server` binary (for serving a GGUF export)."""
    return find().tool("llama-server")


def llama_mtmd_cli() -> Path:
    return find().tool("llama-mtmd-cli")


def llama_quantize() -> Path:
    return find().tool("llama-quantize")


def _installed() -> LlamaCpp | None:
    root = install_dir() / "src"
    tools = LlamaCpp(root, root / "build" / "bin")
    if not (install_dir() / _MARKER).is_file():
        return None
    if not all((tools.bin / t).is_file() for t in TARGETS):
        return None
    return tools


def install(jobs: int | None = None, sdist: str | Path | None = None, force: bool = False) -> LlamaCpp:
    """Build llama.cpp's tools into the cache once; a no-op returning the existing build when it is complete."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with _lock(cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}.lock"):
        existing = _installed()
        if existing is not None and not force:
            print(f"radscribe llamacpp: llama.cpp {LLAMA_CPP_PYTHON} already built in {install_dir()}")
            return existing
        _check_build_tools()
        start = time.monotonic()
        # Build beside the final folder and rename at the end: an interrupted build never looks installed.
        work = Path(tempfile.mkdtemp(prefix=f"llama.cpp-{LLAMA_CPP_PYTHON}.", dir=cache_dir()))
        try:
            archive = Path(sdist) if sdist else _download_sdist(work)
            src = _extract_vendored(archive, work / "src")
            _build(src, jobs or os.cpu_count() or 1)
            seconds = time.monotonic() - start
            (work / _MARKER).write_text(json.dumps(
                {"llama_cpp_python": LLAMA_CPP_PYTHON, "targets": list(TARGETS), "build_seconds": round(seconds),
                 "jobs": jobs or os.cpu_count()}, indent=1) + "\n")
            for leftover in work.glob("*.tar.gz"):
                leftover.unlink()
            if install_dir().exists():
                shutil.rmtree(install_dir())
            work.rename(install_dir())
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    print(f"radscribe llamacpp: built {', '.join(TARGETS)} in {seconds / 60:.1f} min into {install_dir()}")
    tools = _installed()
    assert tools is not None
    return tools


def _check_build_tools() -> None:
    for tool, package in (("cmake", "cmake"), ("c++", "g++"), ("cc", "gcc")):
        if shutil.which(tool) is None:
            raise RadscribeError(f"building llama.cpp needs `{tool}` on PATH: install it (Debian: apt-get install "
                                 f"{package}) or set ${ENV_VAR} to an existing llama.cpp build")


def _download_sdist(dest: Path) -> Path:
    print(f"radscribe llamacpp: downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest),
           f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RadscribeError(f"`pip download llama-cpp-python=={LLAMA_CPP_PYTHON}` failed ({tail[0]}); "
                             f"download the sdist elsewhere and pass it with --sdist FILE")
    return archives[0]


def _extract_vendored(archive: Path, dest: Path) -> Path:
    """Extract only `<sdist>/vendor/llama.cpp/` (without git metadata) into `dest`."""
    if not archive.is_file():
        raise RadscribeError(f"--sdist {archive}: no such file")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar:
            if not member.name.startswith(prefix) or member.name == prefix + ".git":
                continue
            member.name = member.name[len(prefix):]
            members.append(member)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise RadscribeError(f"{archive} holds no {prefix}convert_hf_to_gguf.py: pass the llama-cpp-python "
                                 f"{LLAMA_CPP_PYTHON} source distribution")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python before 3.11.4 (Debian 12's 3.11.2) has no extraction filters: the same refusals by hand
            for member in members:
                if Path(member.name).is_absolute() or ".." in Path(member.name).parts or not (
                        member.isfile() or member.isdir()):
                    raise RadscribeError(f"{archive}: refusing to extract {member.name!r} (an absolute path, a "
                                         "path leaving the folder, a link or a device)")
                member.mode &= 0o755  # as the "data" filter: no setuid/setgid/sticky, no group/other write
            tar.extractall(dest, members=members)
    return dest


def _build(src: Path, jobs: int) -> None:
    build = src / "build"
    print(f"radscribe llamacpp: building {', '.join(TARGETS)} with {jobs} job(s) (74 min with 2 jobs on a loaded "
          "2-core machine)")
    log = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}-build.log"
    log.write_text("")
    for cmd in (["cmake", "-S", str(src), "-B", str(build), *_CMAKE_FLAGS],
                ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]):
        with log.open("a") as out:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RadscribeError(f"`{' '.join(cmd[:2])}` failed building llama.cpp (full log: {log}): "
                                 f"{' | '.join(tail)}")


@contextlib.contextmanager
def _lock(path: Path):
    """One build at a time per cache (two test sessions or a test and a user must not build twice)."""
    import fcntl

    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LlamaServer:
    """`llama-server` on a GGUF (+ mmproj, + LoRA) as a loopback subprocess, for tests and benchmarks.

        with LlamaServer(model, mmproj=mmproj, ctx=2048) as server:
            tokens = server.complete([151644, ...], n_predict=32)          # greedy token ids
            tokens = server.complete("...<__media__>...", images=[png_bytes])

    Binds 127.0.0.1 on a free port, waits for /health, and stops the process on exit. Serving users with our own
    safety defaults is `radscribe serve`'s job, not this class's.
    """

    MEDIA_MARKER = "<__media__>"

    def __init__(self, model: str | Path, mmproj: str | Path | None = None, lora: str | Path | None = None,
                 ctx: int = 2048, threads: int | None = None, extra: tuple[str, ...] = (), timeout_s: float = 300,
                 api_key: str | None = None):
        self.cmd = [str(llama_server()), "-m", str(model), "--host", "127.0.0.1", "--port", "0", "-c", str(ctx),
                    "-t", str(threads or os.cpu_count() or 1), "--no-webui", "--offline", *extra]
        if mmproj is not None:
            self.cmd += ["--mmproj", str(mmproj)]
        if lora is not None:
            self.cmd += ["--lora", str(lora)]
        self.timeout_s = timeout_s
        self.api_key = api_key  # passed in the environment (LLAMA_API_KEY): a command-line key shows in `ps`
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.media_marker = self.MEDIA_MARKER
        self.log: list[str] = []

    def __enter__(self) -> "LlamaServer":
        import socket

        with socket.socket() as probe:  # a free port now; llama-server binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.cmd[self.cmd.index("--port") + 1] = str(port)
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}  # only our settings
        if self.api_key:
            env["LLAMA_API_KEY"] = self.api_key
        self._start(env)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.process.returncode == -signal.SIGILL and "--no-repack" not in self.cmd:
                    # Seen on a VM whose CPU reports AMX and whose kernel grants it, where the first AMX
                    # instruction (ggml's repacked q8_0/q4_K kernels, built for this CPU) still traps; llama.cpp
                    # cannot tell beforehand, so neither can we. Its plain kernels run everywhere.
                    print("radscribe: llama-server stopped on an illegal instruction in its repacked CPU kernels "
                          "(AMX this machine reports but cannot run); starting it again with --no-repack",
                          file=sys.stderr, flush=True)
                    self.cmd.append("--no-repack")
                    self._start(env)
                    continue
                raise RadscribeError(f"llama-server exited ({self.process.returncode}): "
                                     + " | ".join(line.strip() for line in self.log[-3:]))
            try:
                if self._request("GET", "/health", None, timeout=2).get("status") == "ok":
                    # llama-server draws a random media marker per process (so user text cannot forge one)
                    self.media_marker = self._request("GET", "/props", None, timeout=10).get("media_marker")
                    return self
            except (OSError, RadscribeError):  # not listening yet, or 503 while the model loads
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RadscribeError(f"llama-server did not become healthy in {self.timeout_s:.0f} s")

    def _start(self, env: dict) -> None:
        import threading

        self.log = []
        self.process = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env)
        process, log = self.process, self.log
        threading.Thread(target=lambda: log.extend(process.stdout), daemon=True).start()

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, body: dict | None, timeout: float = 600) -> dict:
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:  # llama-server refused the request (e.g. over the context)
            raise RadscribeError(f"llama-server {path}: {_error_message(err.read())}") from None

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        return self._request("POST", path, body, timeout)

    @contextlib.contextmanager
    def stream(self, path: str, body: dict, timeout: float = 600):
        """POST `body` and yield an iterator of its server-sent JSON events; leaving the block closes the
        connection, which makes llama-server stop generating."""
        import http.client

        connection = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=timeout)
        try:
            connection.request("POST", path, json.dumps(body).encode(), self._headers())
            response = connection.getresponse()
            if response.status != 200:
                raise RadscribeError(f"llama-server {path}: {_error_message(response.read())}")

            def events():
                for raw in response:
                    line = raw.decode("utf-8", "replace").strip()
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RadscribeError(f"llama-server {path}: {_error_message(line[6:].encode())}")
                        yield event

            yield events()
        finally:
            connection.close()

    def complete(self, prompt: list[int] | str, n_predict: int = 32, images: list[bytes] = ()) -> list[int]:
        """Greedy continuation token ids (temperature 0, top_k 1, no penalties) of `prompt` (token ids, or a
        string with one MEDIA_MARKER per image)."""
        import base64

        if images:
            prompt = {"prompt_string": prompt.replace(self.MEDIA_MARKER, self.media_marker),
                      "multimodal_data": [base64.b64encode(b).decode() for b in images]}
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "top_p": 1.0,
                "min_p": 0.0, "repeat_penalty": 1.0, "return_tokens": True, "cache_prompt": True, "seed": 0}
        return self._request("POST", "/completion", body)["tokens"]


def _error_message(raw: bytes) -> str:
    """llama-server's error body ({"error": {"message": ...}}) as one line."""
    try:
        error = json.loads(raw).get("error", {})
        return str(error.get("message", error)).splitlines()[0]
    except (ValueError, AttributeError, IndexError):
        return raw.decode("utf-8", "replace")[:200]
