"""Scratch virtual environments for tests that need other library versions than the project's own venv.

Some references cannot share our venv: torchvision (CUDA-linked wheels beside a CPU torch), transformers 4.57,
LLaMA-Factory's pins. A test asks for a venv by its pip requirements; it is built once, cached, and reused:

    from scratch_venv import ScratchVenv

    venv = ScratchVenv(["torch==2.14.1", "torchvision==0.29.1", "transformers==5.24.0", "pillow"])
    result = venv.run('''
        import json, sys, transformers
        print(json.dumps({"version": transformers.__version__, "arg": sys.argv[1]}))
    ''', "some-arg")
    assert result["version"] == "5.24.0"

- The venv lives in CACHE/<key>, key = a hash of the Python version and the sorted requirements, with CACHE =
  $RADSCRIBE_SCRATCH_VENVS or ~/.cache/radscribe/scratch-venvs. The first build of a key installs with pip (from
  this machine's local wheels where pip finds them); later runs only check the `.complete` marker. A build that
  fails leaves nothing behind under the key, so the next run starts clean. Concurrent builders of one key wait on
  a file lock instead of racing.
- radscribe itself is not installed there: `run` puts this checkout's root first on PYTHONPATH, so the snippet
  imports the radscribe code under test (`from radscribe.model.load import load_processor`) with the venv's
  library versions. Only import radscribe modules whose dependencies the requirements provide.
- `run(code, *args)` runs the snippet (dedented) with the venv's python, the args as sys.argv[1:], and returns
  the JSON value printed on the LAST line of its stdout; anything printed before is ignored. Pass tensors
  through files (np.save into a tmp_path) when they are large.
- Nothing here skips: a venv that cannot be built, or a snippet that fails, raises ScratchVenvError with the
  command and the tail of its output, so a broken reference fails the test run instead of turning it green.

The first build of a torch + torchvision venv takes minutes and ~5.5 GB (measured in the test that uses it);
CI keeps the cache for the rest of its run only, so each distinct requirement set costs one build per CI run.

Layered venvs (`base=`): a venv that needs only another transformers beside the big torch + torchvision install
need not install torch again. `ScratchVenv(["transformers==4.57.6"], base=ScratchVenv(TORCHVISION))` builds a
small venv holding transformers 4.57.6 and its own dependencies (tokenizers, huggingface-hub, ...), then appends
the base venv's site-packages to its sys.path with a `.pth` line. Its own packages come first, so they shadow the
base's (the base's transformers 5.24 is never imported there); what it lacks (torch, torchvision, pillow, jinja2)
comes from the base. The `.pth` line is written after pip has run, so pip resolves and installs the layer as if
the base were absent and never touches the base's packages. A layer's key includes its base's key; the base is
built first when missing. Requirements that need torch itself (peft, accelerate) do not belong in a layer: pip
would install a second torch into it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""This checkout's root: first on the snippet's PYTHONPATH, so `import radscribe` finds the code under test."""

TORCHVISION = ["torch==2.14.1", "torchvision==0.29.1", "transformers==5.24.0", "pillow"]
"""torch + torchvision (PyPI's CUDA-linked wheels work on CPU when both come from PyPI), with our transformers:
the AutoProcessor path with a video processor, and the base that transformers-only venvs are layered on."""


class ScratchVenvError(RuntimeError):
    """A scratch venv could not be built, or a snippet run in it failed (never a skip)."""


def cache_root() -> Path:
    return Path(os.environ.get("RADSCRIBE_SCRATCH_VENVS") or Path.home() / ".cache" / "radscribe" / "scratch-venvs")


class ScratchVenv:
    """A cached venv holding exactly `requirements` (pip specifiers); built on first use."""

    def __init__(self, requirements: list[str], pip_args: tuple[str, ...] = (), timeout: float = 3600,
                 base: ScratchVenv | None = None):
        self.requirements = sorted(requirements)
        self.pip_args = tuple(pip_args)
        self.timeout = timeout
        self.base = base
        """A venv whose packages this one sees after its own (see the module docstring), or None."""
        identity = json.dumps({"python": sys.version_info[:2], "requirements": self.requirements,
                               "pip_args": self.pip_args, **({"base": base.key} if base else {})})
        self.key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.path = cache_root() / self.key
        self.build_seconds: float | None = None
        """Seconds the build took in this process; None when the cached venv was reused."""

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"

    def ensure(self) -> ScratchVenv:
        """Build the venv (and its base first) unless a complete one is cached; returns self."""
        if self.base is not None:
            self.base.ensure()
        if (self.path / ".complete").is_file():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f"{self.key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same key: wait for it
            if not (self.path / ".complete").is_file():
                self._build()
        return self

    def _build(self) -> None:
        started = time.perf_counter()
        # Built in place (a venv's scripts hard-code their absolute path); a build killed half-way has no
        # .complete marker and is removed here by the next one.
        shutil.rmtree(self.path, ignore_errors=True)
        log = self.path.with_name(self.key + ".log")
        log.unlink(missing_ok=True)
        try:
            _check([sys.executable, "-m", "venv", str(self.path)], log, self.timeout)
            _check([str(self.python), "-m", "pip", "install", "--no-input", *self.pip_args, *self.requirements],
                   log, self.timeout)
            if self.base is not None:  # after pip: pip resolves the layer alone and never sees the base's packages
                (self.site_packages / "_scratch_venv_base.pth").write_text(f"{self.base.site_packages}\n")
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        based = [f"# layered on {self.base.path}"] if self.base is not None else []
        (self.path / "requirements.txt").write_text("\n".join(self.requirements + based) + "\n")
        (self.path / ".complete").write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
        self.build_seconds = time.perf_counter() - started

    def run(self, code: str, *args: str, timeout: float = 600, env: dict | None = None):
        """Run `code` with the venv's python and this checkout on PYTHONPATH; the JSON of its last stdout line."""
        self.ensure()
        environment = {**os.environ, **(env or {})}
        environment.pop("VIRTUAL_ENV", None)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else []))
        command = [str(self.python), "-c", textwrap.dedent(code), *map(str, args)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
        except subprocess.TimeoutExpired as err:
            raise ScratchVenvError(f"snippet in {self.path} ran past {timeout} s") from err
        if done.returncode != 0:
            raise ScratchVenvError(f"snippet in {self.path} exited {done.returncode}:\n{done.stderr[-4000:]}")
        lines = done.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError) as err:
            raise ScratchVenvError(f"snippet in {self.path} printed no JSON on its last line:\n"
                                   f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}") from err


def _check(command: list[str], log: Path, timeout: float) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ScratchVenvError(f"building a scratch venv failed ({code}): {' '.join(command)}\n"
                               f"full log: {log}\n{tail}")
