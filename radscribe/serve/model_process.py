"""`radscribe serve`'s model in a process of its own: `ModelProcess` is the Engine the API drives, and generates in a
child process that holds the model.

Why: the Batcher's one thread drives generation through thousands of small torch calls a second, each of which
gives Python's GIL up and takes it back. In the server's process, that GIL is also what the event loop (reading
request bodies), the request threads (JSON, base64, bounded DICOM inflating, tokenising prompts) and every refused
request need: under bench/serve_hostile.py the requests that never reached the model slowed generation as much as
the ones that did. In a child process the model has a GIL of its own; the server's process keeps everything that
can be refused (every check, admission, the queue, the decoded images until they are sent).

The protocol is a pipe of pickled tuples. Server -> model: ("complete", job, requests), ("stream", job, request),
("steps", job, requests) then ("step", job, None) for each next slice or ("drop", job, None) to give it up,
("cancel", job, index or None), ("exit", -1, None). Model -> server: ("row", job, (index, generation)) as each row
of a batch stops, ("stepped", job, None) after a slice, ("done", job, generations), ("delta", job, text),
("end", job, None), ("error", job, exception).
Requests travel without their `cancel` event and `answered` hook (neither crosses processes): the server watches
each request's event while it waits and sends a cancel, and the child sets an event of its own, which the
Engine's stopping criteria read at every step; a "row" message calls the request's hook in the server.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from radscribe.errors import RadscribeError
from radscribe.serve.engine import Engine, Generation, Request

class ModelGone(RuntimeError):
    """The model process has exited: the server's fault, not the request's (500, not 400)."""


WATCH_S = 0.05
"""How often a waiting call looks at its requests' cancel events (a client gone is noticed within this)."""


class ModelProcess:
    """An Engine in a child process (spawned: a fork would copy torch's threads), with the processor, sampling
    defaults and image policy of the model it loaded, for the checks the API makes before anything is generated."""

    prompt_tokens = Engine.prompt_tokens
    max_token_chars = Engine.max_token_chars

    def __init__(self, model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
                 quantization: str | None = None, device: str | None = None, batch_size: int = 8):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_model_main, name="radscribe-model", daemon=True,
                                        args=(child, str(model_dir), adapter, dtype, quantization, device, batch_size))
        self._process.start()
        child.close()
        try:
            kind, *payload = self._conn.recv()  # loading takes as long as it takes: the child says when it is done
        except EOFError:
            raise RadscribeError(f"the model process exited while loading {model_dir} (exit code "
                                 f"{self._process.join(5) or self._process.exitcode})") from None
        if kind == "failed":
            self._process.join(5)
            raise payload[0]
        self.processor, self.defaults, self.image_policy = payload
        self.tokenizer = self.processor.tokenizer
        self._jobs: dict[int, queue.Queue] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one writer on the pipe at a time, and the job table
        self._gone: str | None = None
        threading.Thread(target=self._read, name="radscribe-model-reader", daemon=True).start()

    # --- what the API calls ----------------------------------------------------------------------------------
    def complete(self, requests: list[Request], batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """As `Engine.complete`, generated in the model process; a request whose `cancel` is set is stopped there."""
        job, replies = self._open("complete", [_portable(r) for r in requests])
        try:
            return self._reply(job, replies, requests, set())[1]
        finally:
            self._close(job)

    def complete_steps(self, requests: list[Request], batch_size: int | None = None):
        """As `Engine.complete_steps`: each step is one slice run in the model process, which keeps the work
        done so far (encoded prompts, image features) until the next step, or until this generator is closed."""
        job, replies = self._open("steps", [_portable(r) for r in requests])
        cancelled: set[int] = set()
        done = False
        try:
            while True:
                kind, payload = self._reply(job, replies, requests, cancelled)
                if kind != "stepped":
                    done = True
                    return payload
                yield
                self._cancels(job, requests, cancelled)  # those of clients gone meanwhile: before the next slice
                self._send(("step", job, None))
        finally:
            if not done:
                self._send(("drop", job, None))  # closed half way: the child lets the work go
            self._close(job)

    def stream(self, request: Request) -> Iterator[str]:
        """As `Engine.stream`: text deltas as they are generated; closing the iterator stops generation."""
        job, replies = self._open("stream", _portable(request))
        ended = False
        try:
            while True:
                try:
                    kind, payload = replies.get(timeout=WATCH_S)
                except queue.Empty:
                    if request.cancel is not None and request.cancel.is_set():
                        break
                    continue
                if kind == "delta":
                    yield payload
                    continue
                ended = True
                if kind == "error":
                    raise payload
                return
        finally:
            if not ended:
                self._send(("cancel", job, None))  # the child stops at its next step; its "end" finds no one
            self._close(job)

    def close(self) -> None:
        """Stop the model process (it is a daemon too: it also ends with this one)."""
        # Said, not just closed: the pipe's end stays open while this side's reader is blocked on it, so the
        # child would not see an end of file.
        self._send(("exit", -1, None))
        for stop, seconds in ((None, 10), (self._process.terminate, 5), (self._process.kill, 5)):
            if stop is not None:
                stop()  # it did not exit when told: stuck somewhere, or (kill) where SIGTERM is not acted on
            if self._reaped(seconds):
                return

    def _reaped(self, seconds: float) -> bool:
        """Whether the child has exited and been reaped within `seconds`. Not one `join(seconds)`: that returns as
        soon as the child's end of its sentinel pipe is closed, which the kernel does just before the child can be
        reaped, and then leaves `exitcode` None (seen in 1 of 6 closes here)."""
        deadline = time.monotonic() + seconds
        while self._process.exitcode is None and time.monotonic() < deadline:
            self._process.join(0.05)
            time.sleep(0.005)  # join returns at once in that window: don't spin
        return self._process.exitcode is not None

    # --- internals -------------------------------------------------------------------------------------------
    def _open(self, kind: str, payload) -> tuple[int, queue.Queue]:
        replies: queue.Queue = queue.Queue()
        with self._lock:
            if self._gone:
                raise ModelGone(self._gone)
            job = next(self._ids)
            try:
                self._conn.send((kind, job, payload))
            except OSError:  # the child has gone and this side's reader has not seen it yet
                raise ModelGone(self._exited()) from None
            self._jobs[job] = replies
        return job, replies

    def _reply(self, job: int, replies: queue.Queue, requests: list[Request], cancelled: set[int]) -> tuple:
        """The job's next reply other than a row ("done", "stepped"; an "error" is raised): meanwhile each row
        that stops goes to its request's `answered` hook, and each request whose `cancel` is set is cancelled in
        the child (`cancelled`: those told already)."""
        while True:
            try:
                kind, payload = replies.get(timeout=WATCH_S)
            except queue.Empty:
                self._cancels(job, requests, cancelled)
                continue
            if kind == "row":
                index, answer = payload
                if requests[index].answered is not None:
                    requests[index].answered(answer)
                continue
            if kind == "error":
                raise payload
            return kind, payload

    def _cancels(self, job: int, requests: list[Request], cancelled: set[int]) -> None:
        for index, r in enumerate(requests):
            if index not in cancelled and r.cancel is not None and r.cancel.is_set():
                cancelled.add(index)
                self._send(("cancel", job, index))

    def _send(self, message: tuple) -> None:
        with self._lock:
            if not self._gone:
                try:
                    self._conn.send(message)
                except OSError:
                    pass  # a cancel or exit for a process that has gone already

    def _exited(self) -> str:
        self._process.join(1)
        return f"the model process has exited (exit code {self._process.exitcode}); restart radscribe serve"

    def _close(self, job: int) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def _read(self) -> None:
        while True:
            try:
                kind, job, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                replies = self._jobs.get(job)
            if replies is not None:
                replies.put((kind, payload))
        gone = self._exited()
        with self._lock:
            self._gone = gone
            for replies in self._jobs.values():
                replies.put(("error", ModelGone(self._gone)))


def _portable(request: Request) -> Request:
    return dataclasses.replace(request, cancel=None, answered=None)


def _model_main(conn, model_dir, adapter, dtype, quantization, device, batch_size) -> None:
    """The child: load the Engine, say so, then run the jobs in arrival order (the API's Batcher sends one at a
    time; a sliced job waits here between its steps) while a reader thread takes the cancels as they come."""
    from tqdm import tqdm

    # tqdm's default lock (for the loading bars) is a multiprocessing semaphore, which the os._exit below would
    # leave for the resource tracker to remove and warn about when the server stops; a thread lock does here.
    tqdm.set_lock(threading.RLock())
    try:
        engine = Engine.from_pretrained(model_dir, adapter=adapter, dtype=dtype, quantization=quantization,
                                        device=device, batch_size=batch_size)
    except BaseException as err:  # noqa: BLE001 - said to the server, which raises it
        conn.send(("failed", _sendable(err)))
        return
    conn.send(("ready", engine.processor, engine.defaults, engine.image_policy))
    jobs: queue.Queue = queue.Queue()
    events: dict[int, list[threading.Event]] = {}
    send_lock = threading.Lock()

    def send(message):
        with send_lock:
            conn.send(message)

    def read():
        while True:
            try:
                kind, job, payload = conn.recv()
            except (EOFError, OSError):  # the server has gone: so does this process
                jobs.put(None)
                return
            if kind == "exit":
                jobs.put(None)
                return
            if kind == "cancel":
                for index, event in enumerate(events.get(job, ())):
                    if payload is None or payload == index:
                        event.set()
                continue
            if kind in ("complete", "steps", "stream"):
                # the events exist before the job runs: a cancel that comes before it starts still counts
                events[job] = [threading.Event() for _ in (payload if kind != "stream" else [payload])]
            jobs.put((kind, job, payload))

    threading.Thread(target=read, daemon=True).start()
    stepping: dict = {}  # job -> the Engine.complete_steps generator of a sliced job between two of its steps
    while (message := jobs.get()) is not None:
        kind, job, payload = message
        cancel = events.get(job, ())
        try:
            if kind == "complete":
                answers = engine.complete(_answering(payload, cancel, send, job))
                send(("done", job, answers))
            elif kind in ("steps", "step"):
                if kind == "steps":
                    stepping[job] = engine.complete_steps(_answering(payload, cancel, send, job))
                try:
                    next(stepping[job])
                    send(("stepped", job, None))
                except StopIteration as done:
                    del stepping[job]
                    send(("done", job, done.value))
            elif kind == "drop":
                steps = stepping.pop(job, None)
                if steps is not None:
                    steps.close()
            else:
                deltas = engine.stream(dataclasses.replace(payload, cancel=cancel[0]))
                try:
                    for delta in deltas:
                        if cancel[0].is_set():
                            break
                        send(("delta", job, delta))
                finally:
                    deltas.close()  # the engine stops generating when its iterator is closed
                send(("end", job, None))
        except Exception as err:  # noqa: BLE001 - the server answers it (400 for a RadscribeError, else 500)
            stepping.pop(job, None)
            send(("error", job, _sendable(err)))
        finally:
            if job not in stepping:
                events.pop(job, None)
            message = payload = cancel = None  # the images go with the job
    # Told to exit (or the server has gone): skip the interpreter's teardown of torch and transformers, which
    # nothing here needs and which took 0.9 s of every stop on an idle 2-core machine (more on a loaded one).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _answering(requests: list[Request], cancel: list[threading.Event], send, job: int) -> list[Request]:
    """The job's requests with the child's cancel events, each row's answer sent to the server as it stops."""
    return [dataclasses.replace(r, cancel=c, answered=_row_sender(send, job, i))
            for i, (r, c) in enumerate(zip(requests, cancel))]


def _row_sender(send, job: int, index: int):
    """The `answered` hook of row `index` of `job`: its answer to the server as soon as the row stops."""
    return lambda answer: send(("row", job, (index, answer)))


def _sendable(err: BaseException) -> BaseException:
    """`err` if it survives pickling, else a RuntimeError saying what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")
