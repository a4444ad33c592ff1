"""The edge's background sender: uploads leave without the edge's compute waiting on them.

The compute thread puts work on a queue; this thread owns the PUSH socket (ZeroMQ sockets
belong to one thread), numbers each session's uploads and sends them, zero copy. In shared
memory mode it writes the rows straight into the device's segment on the cloud host and sends
only a small UPLOAD_SHM notice.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np
import zmq

from cecollm.cache import shm
from cecollm.wire import edge_cloud as ep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Session:
    device_id: int
    session: int
    segment: str  # "" unless rows go through shared memory
    capacity: int
    rows_offset: int  # byte offset of row 0 in the segment


@dataclass(frozen=True)
class _Rows:
    start: int
    rows: np.ndarray  # [n, hidden], wire dtype
    drafts: tuple[int, ...] = ()  # exact mode: the edge's token after each row


@dataclass(frozen=True)
class _Epoch:
    epoch: int  # the session rolled back: uploads from now on belong to this epoch, numbered from 0


@dataclass(frozen=True)
class _End:
    pass


class _Link:
    """The sender thread's current session: its upload count and mapped segment."""

    def __init__(self) -> None:
        self.session: _Session | None = None
        self.seq = 0  # the next upload's number in the session's epoch
        self.epoch = 0  # the session's roll-backs so far (exact mode)
        self.segment: shm.Attachment | None = None  # mapped when rows go through shared memory
        self.stalled = False  # an upload was given up on: the rest of the session's rows are dropped

    def detach(self) -> None:
        """Forget the session and unmap its segment."""
        if self.segment is not None:
            self.segment.close()
        self.session, self.segment, self.stalled = None, None, False


class UploadSender:
    """Sends a session's rows (TCP/IPC bytes or shared memory) and its END, in order."""

    def __init__(self, context: zmq.Context, address: str, send_timeout: float = 5.0, keys=None) -> None:
        """`keys` (security.ClientKeys): speak CURVE to the content manager."""
        self.context = context
        self.address = address
        self.keys = keys
        self.send_timeout = send_timeout
        self.queue: queue.Queue = queue.Queue()
        self.bytes_sent = 0  # what went over the socket
        self.shm_bytes = 0  # what went through shared memory
        self.dropped = 0  # messages given up on (the cloud was unreachable)
        self._thread = threading.Thread(target=self._run, name="upload-sender", daemon=True)
        self._thread.start()

    def open(self, device_id: int, session: int, segment: str = "", capacity: int = 0, rows_offset: int = 0) -> None:
        """Rows from now on belong to this session (segment: write them into shared memory)."""
        self.queue.put(_Session(device_id, session, segment, capacity, rows_offset))

    def rows(self, start: int, rows: np.ndarray, drafts: tuple[int, ...] = ()) -> None:
        self.queue.put(_Rows(start, rows, tuple(drafts)))

    def new_epoch(self, epoch: int) -> None:
        """The session rolled back (exact mode): later rows are the next epoch's."""
        self.queue.put(_Epoch(epoch))

    def end(self) -> None:
        self.queue.put(_End())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far has been handed to the socket (or given up on);
        False if that took longer than `timeout` seconds (None: no limit; every send is bounded)."""
        with self.queue.all_tasks_done:
            return self.queue.all_tasks_done.wait_for(lambda: not self.queue.unfinished_tasks, timeout)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=self.send_timeout + 2)

    def _run(self) -> None:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, int(self.send_timeout * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout * 1000))
        if self.keys is not None:
            self.keys.secure(sock)
        sock.connect(self.address)
        self._link = _Link()
        try:
            while True:
                item = self.queue.get()
                try:
                    if item is None:
                        return
                    self._handle(sock, item)
                except Exception:  # a bug must not stop the thread: flush() would wait for ever
                    self.dropped += 1
                    log.exception("upload sender: %r dropped", type(item).__name__)
                finally:
                    self.queue.task_done()
        finally:
            self._link.detach()
            sock.close()

    def _handle(self, sock: zmq.Socket, item) -> None:
        link = self._link
        if isinstance(item, _Session):
            link.detach()
            link.session, link.seq, link.epoch = item, 0, 0
            if item.segment:
                try:
                    link.segment = shm.attach(item.segment)
                except (OSError, ValueError) as exc:  # another host, most likely; or a bad name
                    log.warning("shared memory %r is not reachable here (%s); uploading over %s",
                                item.segment, getattr(exc, "strerror", None) or exc, self.address)
        elif link.session is None:
            return  # no session: standalone, nothing goes up
        elif isinstance(item, _Epoch):
            link.epoch, link.seq, link.stalled = item.epoch, 0, False
        elif isinstance(item, _Rows):
            if link.stalled:  # the cloud missed an upload: the session is broken there, rows are moot
                self.dropped += 1
                return
            link.stalled = not self._send(sock, self._upload(link, item))
            link.seq += 1
        else:
            self._send(sock, ep.End(link.session.device_id, link.session.session).to_frames())
            link.detach()  # the cloud releases the segment: mapping it would keep its memory

    def _upload(self, link: _Link, item: _Rows) -> list:
        session, segment, seq, marks = link.session, link.segment, link.seq, dict(epoch=link.epoch, drafts=item.drafts)
        n, hidden = item.rows.shape
        if segment is None or item.start + n > session.capacity:
            return ep.Upload(session.device_id, session.session, seq, item.start, item.rows, **marks).to_frames()
        offset = session.rows_offset + item.start * hidden * item.rows.dtype.itemsize
        target = np.ndarray((n, hidden), dtype=item.rows.dtype, buffer=segment.buf, offset=offset)
        target[:] = item.rows  # [n, hidden] straight into the cloud's segment
        del target
        self.shm_bytes += item.rows.nbytes
        return ep.UploadShm(session.device_id, session.session, seq, item.start, n, **marks).to_frames()

    def _send(self, sock: zmq.Socket, frames: list) -> bool:
        """Whether the socket took the message within the send timeout."""
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            self.dropped += 1
            log.warning("upload dropped: the cloud did not take it within %g s", self.send_timeout)
            return False
        self.bytes_sent += sum(len(memoryview(f)) if not isinstance(f, bytes) else len(f) for f in frames)
        return True
