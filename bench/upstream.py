"""The Docker Hub stand-in on the far side of an emulated WAN, as a worker process.

Run by :class:`Upstream` as ``ip netns exec <wan> python -m bench.upstream``: the
stand-in (``tests.support.hub.FakeDockerHub``, a Python front before a real registry)
listens on the namespace's loopback, and a :class:`~bench.wanlink.DelayRelay` exposes it
on the veth address. Its own process, so that the front's copying does not compete with
the benchmark for one interpreter lock.

It takes one JSON request per line on stdin and answers one JSON line each; the token
comes in the first request, never on the command line. It exits, stopping the stand-in
and its registry, when stdin closes, so it cannot outlive the benchmark.
"""

import json
import os
import signal
import subprocess
import sys

from bench.wanlink import DelayRelay
from tests.support.hub import FakeDockerHub
from tests.support.processes import stop_group

START_TIMEOUT = 60


def serve(requests, answer):
    hub = relay = None
    try:
        for line in requests:
            request = json.loads(line)
            op = request["op"]
            try:
                if op == "start":
                    hub = FakeDockerHub(
                        request["workdir"], username=request["username"], token=request["token"], ratelimit=None
                    ).start()
                    relay = DelayRelay((request["listen"], 0), ("127.0.0.1", hub.port), request.get("one_way", 0.0)).start()
                    public = f"http://{request['listen']}:{relay.port}"
                    # What the stand-in tells clients (token realm, redirects) must be
                    # reachable across the link.
                    hub.url = public
                    hub.realm = f"{public}/token"
                    answer({"url": public, "hostport": f"{request['listen']}:{relay.port}", "backend_pid": hub.backend.pid})
                elif op == "push":
                    hub.push_image(request["layout"], request["tag"], request["repo"], dest_tag=request.get("dest_tag"))
                    answer({})
                elif op == "delay":
                    relay.one_way = float(request["one_way"])
                    answer({})
                elif op == "reset":
                    hub.reset_counts()
                    answer({})
                elif op == "counts":
                    answer(hub.counts())
                elif op == "requests":
                    with hub._lock:  # pylint: disable=protected-access
                        answer(list(hub.requests))
                elif op == "stop":
                    answer({})
                    return
                else:
                    answer({"error": f"unknown op {op!r}"})
            except (OSError, ValueError, KeyError, RuntimeError, subprocess.CalledProcessError) as exc:
                answer({"error": repr(exc)})
    finally:
        if relay is not None:
            relay.stop()
        if hub is not None:
            hub.stop()


def main():
    # Answers go on the original stdout; anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def answer(obj):
        channel.write(json.dumps(obj) + "\n")

    def on_term(signum, frame):  # pylint: disable=unused-argument
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    serve(sys.stdin, answer)


class Upstream:
    """The orchestrator's handle on the worker (runs it in ``netns``)."""

    def __init__(self, netns, workdir, listen, username, token, one_way=0.0):
        self.netns = netns
        self.log = open(f"{workdir}/upstream.log", "ab")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "bench.upstream"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        try:
            started = self.call(
                op="start", workdir=str(workdir), listen=listen, username=username, token=token, one_way=one_way
            )
        except Exception:
            self.stop()
            raise
        self.url = started["url"]
        self.hostport = started["hostport"]
        self.backend_pid = started["backend_pid"]

    def call(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.upstream exited ({self.proc.poll()}) during {request['op']}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench.upstream {request['op']}: {reply['error']}")
        return reply

    def push(self, layout, tag, repo):
        self.call(op="push", layout=str(layout), tag=tag, repo=repo)

    def set_delay(self, one_way):
        self.call(op="delay", one_way=one_way)

    def reset(self):
        self.call(op="reset")

    def counts(self):
        return self.call(op="counts")

    def requests(self):
        """The stand-in's log of registry requests since the last reset."""
        return self.call(op="requests")

    def stop(self):
        try:
            self._stop()
        finally:
            self.log.close()

    def _stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
                return
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        stop_group(self.proc, 10)
        # The stand-in's registry has a session of its own, which a worker that died
        # before its cleanup leaves behind.
        backend = getattr(self, "backend_pid", None)
        if backend:
            try:
                os.killpg(backend, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
