"""Faults the Docker Hub stand-in can inject into a blob transfer, for the reliability suite.

:class:`FaultyHub` is the stand-in (:class:`~tests.support.hub.FakeDockerHub`) with two more
knobs on blob downloads: a rate limit, so that a test can act while a transfer is in
flight, and a one-shot cut, which takes the whole stand-in down after a given number of
body bytes of a blob, as an upstream that dies in the middle of a download.
"""

import threading
import time

from .hub import FakeDockerHub, classify

# Small writes keep the pace even and let a cut land close to its byte count.
PACED_CHUNK = 16 * 1024


class _Progress:
    """Body bytes the stand-in has sent per blob digest, with a way to wait for them."""

    def __init__(self):
        self._sent = {}
        self._cond = threading.Condition()

    def add(self, digest, count):
        with self._cond:
            self._sent[digest] = self._sent.get(digest, 0) + count
            self._cond.notify_all()

    def sent(self, digest):
        with self._cond:
            return self._sent.get(digest, 0)

    def wait(self, digest, count, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: self._sent.get(digest, 0) >= count, timeout)

    def clear(self):
        with self._cond:
            self._sent.clear()


class _FaultyBody:
    """The backend's response with a paced, cuttable ``read`` for one blob GET."""

    def __init__(self, hub, handler, resp, digest):
        self._hub = hub
        self._handler = handler
        self._resp = resp
        self._digest = digest
        self._cut_pending = False

    def __getattr__(self, name):
        return getattr(self._resp, name)

    def read(self, amount=-1):
        if self._cut_pending:
            self._die()
        rate = self._hub.blob_rate
        if rate:
            amount = PACED_CHUNK if amount is None or amount < 0 else min(amount, PACED_CHUNK)
        chunk = self._resp.read(amount)
        if not chunk:
            return chunk
        limit = self._hub.take_cut(self._digest, len(chunk))
        if limit == 0:
            self._die()
        if limit is not None:
            # Send exactly the bytes up to the cut; the next read takes the stand-in down.
            chunk = chunk[:limit]
            self._cut_pending = True
        self._hub.progress.add(self._digest, len(chunk))
        if rate:
            time.sleep(len(chunk) / rate)
        return chunk

    def _die(self):
        try:
            self._handler.wfile.flush()
        except OSError:
            pass
        self._hub.block()
        self._hub.cuts.append(self._digest)
        raise ConnectionResetError("FaultyHub: the upstream died in the middle of a blob")


class FaultyHub(FakeDockerHub):
    """A :class:`FakeDockerHub` whose blob downloads can be slowed down and cut.

    ``set_blob_rate(bytes_per_second)`` paces every blob body (``None`` for full speed).
    ``cut_blob(digest, after)`` arms a one-shot fault: once the stand-in has sent
    ``after`` body bytes of that blob in one response, it goes down like ``block()``
    (listener closed, every open connection reset, refused from then on) until
    ``unblock()``. ``progress`` counts blob body bytes sent per digest; ``cuts`` lists
    the digests whose transfer was cut.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blob_rate = None
        self.progress = _Progress()
        self.cuts = []
        self._cut = None  # [digest, bytes left before the cut]
        self._cut_lock = threading.Lock()

    def set_blob_rate(self, bytes_per_second):
        self.blob_rate = float(bytes_per_second) if bytes_per_second else None

    def cut_blob(self, digest, after=0):
        """Arm the one-shot cut for ``digest`` (``None``: disarm)."""
        with self._cut_lock:
            self._cut = None if digest is None else [digest, int(after)]

    def take_cut(self, digest, length):
        """How many of ``length`` bytes may still go out before the armed cut (None: all)."""
        with self._cut_lock:
            if self._cut is None or self._cut[0] != digest:
                return None
            if length < self._cut[1]:
                self._cut[1] -= length
                return None
            left = self._cut[1]
            self._cut = None
            return left

    def reset_counts(self):
        super().reset_counts()
        self.progress.clear()
        self.cuts.clear()

    def _stream_response(self, h, resp, extra_headers):
        kind, _, digest = classify(h.path.split("?", 1)[0])
        if kind == "blob" and h.command == "GET" and resp.status == 200:
            resp = _FaultyBody(self, h, resp, digest)
        super()._stream_response(h, resp, extra_headers)
