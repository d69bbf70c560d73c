"""`radscribe serve`'s model in a process of its own: `ModelProcess` is the Engine the API drives, and generates in a
child process that holds the model.

Why: the Batcher's one thread drives generation through thousands of small torch calls a second, each of which
gives Python's GIL up and takes it back. In the server's process, that GIL is also what the event loop (reading
request bodies), the request threads (JSON, base64, bounded DICOM inflating, tokenising prompts) and every refused
request need: under bench/serve_hostile.py the requests that never reached the model slowed generation as much as
the ones that did. In a child process the model has a GIL of its own; the server's process keeps everything that
can be refused (every check, admission, the queue, the decoded images until they are sent).

The protocol is a pipe of pickled tuples. Server -> model: ("prepare", key, request), ("forget", key, None),
("complete", job, requests), ("stream", job, request), ("cancel", job, index or None), ("ahead", job, None), ("exit", -1, None). Model -> server: ("row", job, (index, generation)) as each row
of a batch stops, ("done", job, generations), ("delta", job, text), ("end", job, None), ("error", job, exception).
Requests travel without their `cancel` event and `answered` hook (neither crosses processes): the server watches
each request's event while it waits and sends a cancel, and the child sets an event of its own, which the
Engine's stopping criteria read at every step; a "row" message calls the request's hook in the server.

Encoding ahead: a request of large images (`ENCODE_AHEAD_PIXELS`) is sent with "prepare" as soon as it is queued,
and the child's encoder thread, below the model's CPU priority and with a processor of its own, turns it into
model inputs while the model generates for others; its "complete" then finds the row made (`AheadKey`) and the
model's hold shrinks by the processor's share (a third of a 0.6 s hold for four 4096x4096 uploads,
bench/serve_hostile.py). A row not ready when its batch runs is encoded there as before: nothing waits for the
encoder. Small requests are not sent ahead: their processing is a few milliseconds, less than the pickling.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from radscribe.errors import RadscribeError
from radscribe.serve.engine import Engine, Generation, Request

ENCODE_AHEAD_PIXELS = 1024 * 1024
"""Image pixels (as the API sized them for the processor) from which a queued request is encoded ahead."""
ENCODE_AHEAD_BYTES = 256 * 1024 * 1024
"""Most bytes of rows encoded ahead that the model process holds (four requests of four 768x768 images in fp32);
past it a request is encoded with its batch."""


@dataclasses.dataclass(frozen=True)
class AheadKey:
    """`Request.encoded` of a request sent ahead: which row the model process may have made for it."""

    key: int


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
    def prepare(self, request: Request) -> Request:
        """`request` as the Batcher should queue it: a request of large images is sent to the model process now,
        to be encoded while it waits, and comes back marked with its key; any other comes back as it is."""
        pixels = sum(part["image"].width * part["image"].height for m in request.messages
                     if isinstance(m.get("content"), list) for part in m["content"]
                     if part.get("type") == "image" and hasattr(part.get("image"), "width"))
        if pixels < ENCODE_AHEAD_PIXELS:
            return request
        with self._lock:
            key = next(self._ids)
        self._send(("prepare", key, _portable(request)))
        return dataclasses.replace(request, encoded=AheadKey(key))

    def ahead(self) -> tuple[int, int, int]:
        """(rows, bytes) the model process holds encoded ahead now, and how many rows made ahead batches have
        used so far."""
        job, replies = self._open("ahead", None)
        try:
            kind, payload = replies.get(timeout=30)
        finally:
            self._close(job)
        if kind == "error":
            raise payload
        return payload

    def forget(self, request: Request) -> None:
        """`request` will not run (its client left while it was queued): drop what was encoded for it."""
        if isinstance(request.encoded, AheadKey):
            self._send(("forget", request.encoded.key, None))

    def complete(self, requests: list[Request], batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """As `Engine.complete`, generated in the model process; a request whose `cancel` is set is stopped there."""
        job, replies = self._open("complete", [_portable(r) for r in requests])
        cancelled: set[int] = set()
        try:
            while True:
                try:
                    kind, payload = replies.get(timeout=WATCH_S)
                except queue.Empty:
                    for index, r in enumerate(requests):
                        if index not in cancelled and r.cancel is not None and r.cancel.is_set():
                            cancelled.add(index)
                            self._send(("cancel", job, index))
                    continue
                if kind == "row":
                    index, answer = payload
                    if requests[index].answered is not None:
                        requests[index].answered(answer)
                    continue
                if kind == "error":
                    raise payload
                return payload
        finally:
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
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

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
    time) while a reader thread takes the cancels as they come."""
    try:
        engine = Engine.from_pretrained(model_dir, adapter=adapter, dtype=dtype, quantization=quantization,
                                        device=device, batch_size=batch_size)
    except BaseException as err:  # noqa: BLE001 - said to the server, which raises it
        conn.send(("failed", _sendable(err)))
        return
    conn.send(("ready", engine.processor, engine.defaults, engine.image_policy))
    ahead = _Ahead(engine)
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
            if kind in ("prepare", "forget"):
                ahead.take(kind, job, payload)
                continue
            if kind == "ahead":
                with ahead.lock:
                    send(("done", job, (len(ahead.rows), ahead.bytes, ahead.used)))
                continue
            if kind == "cancel":
                for index, event in enumerate(events.get(job, ())):
                    if payload is None or payload == index:
                        event.set()
                continue
            # the events exist before the job runs: a cancel that comes before it starts still counts
            events[job] = [threading.Event() for _ in (payload if kind == "complete" else [payload])]
            jobs.put((kind, job, payload))

    threading.Thread(target=read, daemon=True).start()
    while (message := jobs.get()) is not None:
        kind, job, payload = message
        cancel = events[job]
        try:
            if kind == "complete":
                answers = engine.complete([dataclasses.replace(r, cancel=c, answered=_row_sender(send, job, i),
                                                               encoded=ahead.row(r.encoded))
                                           for i, (r, c) in enumerate(zip(payload, cancel))])
                send(("done", job, answers))
            else:
                deltas = engine.stream(dataclasses.replace(payload, cancel=cancel[0], encoded=ahead.row(payload.encoded)))
                try:
                    for delta in deltas:
                        if cancel[0].is_set():
                            break
                        send(("delta", job, delta))
                finally:
                    deltas.close()  # the engine stops generating when its iterator is closed
                send(("end", job, None))
        except Exception as err:  # noqa: BLE001 - the server answers it (400 for a RadscribeError, else 500)
            send(("error", job, _sendable(err)))
        finally:
            events.pop(job, None)
            message = payload = None  # the images go with the job


class _Ahead:
    """The child's encoder thread and the rows it has made, by key. A row is kept only while its request is
    wanted (not yet run, not forgotten) and while the rows held stay within ENCODE_AHEAD_BYTES."""

    def __init__(self, engine: Engine):
        import copy

        # A processor of its own: a fast tokenizer's padding settings are state, and the model's thread pads
        # its batches with the engine's processor meanwhile ("Already borrowed" if they shared one).
        self.engine = copy.copy(engine)
        self.engine.processor = copy.deepcopy(engine.processor)
        self.engine.tokenizer = self.engine.processor.tokenizer
        self.waiting: queue.Queue = queue.Queue()
        self.wanted: set[int] = set()
        self.rows: dict[int, dict] = {}
        self.bytes = 0
        self.used = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="radscribe-encode-ahead", daemon=True).start()

    def take(self, kind: str, key: int, request: Request | None) -> None:
        with self.lock:
            if kind == "prepare":
                self.wanted.add(key)
                self.waiting.put((key, request))
            else:
                self._drop(key)

    def row(self, encoded):
        """The row made for an `AheadKey` (now given up by the encoder), or None: encode it with its batch."""
        if not isinstance(encoded, AheadKey):
            return encoded
        with self.lock:
            row = self.rows.get(encoded.key)
            self._drop(encoded.key)
            self.used += row is not None
        return row

    def _drop(self, key: int) -> None:
        self.wanted.discard(key)
        row = self.rows.pop(key, None)
        if row is not None:
            self.bytes -= _nbytes(row)

    def _run(self) -> None:
        from radscribe.serve.api import at_intake_priority

        at_intake_priority(lambda: None)  # this thread, for good, below the model's
        while True:
            key, request = self.waiting.get()
            with self.lock:
                if key not in self.wanted:
                    continue
            try:
                row = self.engine.encode(request)
            except Exception:  # noqa: BLE001 - encoded again with its batch, which reports the error
                continue
            finally:
                request = None
            with self.lock:
                if key in self.wanted and self.bytes + _nbytes(row) <= ENCODE_AHEAD_BYTES:
                    self.rows[key] = row
                    self.bytes += _nbytes(row)
            row = None


def _nbytes(row: dict) -> int:
    return sum(t.numel() * t.element_size() for t in row.values())


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
