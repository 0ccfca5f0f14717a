"""An emulated WAN link between two network namespaces.

Two namespaces joined by a veth pair: ``wan`` (Docker Hub's side) and ``lan`` (the build
host's). The link gets a bandwidth and a round-trip time:

- With ``sch_netem`` in the kernel, netem on both veth ends does both (delay RTT/2 and
  the rate, per direction).
- Without it (this project's CI kernel is built without ``CONFIG_NET_SCH_NETEM`` and has
  no modules), the kernel's ``tbf`` on both veth ends does the rate, and
  :class:`DelayRelay` in front of the server does the delay: it holds every chunk of
  data RTT/2 in each direction before passing it on, and the first chunk of a
  connection one RTT more (the TCP handshake a real WAN would cost). What that does not
  model is TCP's own window growth over a long RTT; at these sizes (100 MB in seconds)
  slow start is a few RTTs, a small part of the transfer.
"""

import queue
import socket
import subprocess
import threading
import time

from tests.support.clients import NetNS
from tests.support.netutil import accepted, listening_socket

WAN_ADDR = "10.231.0.1"
LAN_ADDR = "10.231.0.2"
PREFIX_LEN = 30
WAN_DEV = "veth-wan"
LAN_DEV = "veth-lan"
CHUNK = 64 * 1024
# Chunks held per direction: 4 MB, above the bandwidth-delay product of every profile.
QUEUE_CHUNKS = 64


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _tc(netns, *args, check=True):
    return subprocess.run(
        ["ip", "netns", "exec", netns.name, "tc", *args], check=check, capture_output=True, text=True, timeout=30
    )


class WanLink:
    """The two namespaces and the veth between them; :meth:`shape` sets a profile."""

    def __init__(self, prefix):
        self.wan = NetNS(prefix=f"{prefix}-wan")
        self.lan = NetNS(prefix=f"{prefix}-lan")
        self.netem = None

    def create(self):
        self.wan.create()
        try:
            self.lan.create()
            # Created straight into the namespaces: neither end ever exists on the host.
            _ip("link", "add", WAN_DEV, "netns", self.wan.name, "type", "veth", "peer", "name", LAN_DEV, "netns", self.lan.name)
            _ip("-n", self.wan.name, "addr", "add", f"{WAN_ADDR}/{PREFIX_LEN}", "dev", WAN_DEV)
            _ip("-n", self.lan.name, "addr", "add", f"{LAN_ADDR}/{PREFIX_LEN}", "dev", LAN_DEV)
            _ip("-n", self.wan.name, "link", "set", WAN_DEV, "up")
            _ip("-n", self.lan.name, "link", "set", LAN_DEV, "up")
            self.netem = self._netem_available()
        except Exception:
            self.delete()
            raise
        return self

    def delete(self):
        # Deleting a namespace deletes its veth end, and with it the peer.
        self.lan.delete()
        self.wan.delete()

    def _netem_available(self):
        probe = _tc(self.lan, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        if probe.returncode == 0:
            _tc(self.lan, "qdisc", "del", "dev", "lo", "root", check=False)
            return True
        return False

    @property
    def emulator(self):
        return "netem" if self.netem else "tbf rate + userspace delay relay (no sch_netem in this kernel)"

    def shape(self, rate_mbit, rtt_ms):
        """Set the link's rate and RTT. Returns the one-way delay the relay must add (0
        when netem does it)."""
        relay_delay = 0.0
        for netns, dev in ((self.wan, WAN_DEV), (self.lan, LAN_DEV)):
            _tc(netns, "qdisc", "del", "dev", dev, "root", check=False)
            if self.netem and (rate_mbit or rtt_ms):
                args = ["qdisc", "add", "dev", dev, "root", "netem", "limit", "100000"]
                if rtt_ms:
                    args += ["delay", f"{rtt_ms / 2}ms"]
                if rate_mbit:
                    args += ["rate", f"{rate_mbit}mbit"]
                _tc(netns, *args)
            elif rate_mbit:
                # A 4 ms burst at the rate (at least 64 KB: one GSO segment), and a queue
                # deep enough that TCP, not tbf, sets the pace.
                burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))
                _tc(netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms")
        if not self.netem and rtt_ms:
            relay_delay = rtt_ms / 2000
        return relay_delay

    def qdiscs(self):
        return {
            "wan": _tc(self.wan, "qdisc", "show", "dev", WAN_DEV).stdout.strip(),
            "lan": _tc(self.lan, "qdisc", "show", "dev", LAN_DEV).stdout.strip(),
        }


class DelayRelay:
    """A TCP relay that delays each direction by ``one_way`` seconds.

    Listens on ``listen`` (host, port) and connects each client to ``target``. Data is
    forwarded in chunks, each released ``one_way`` after it arrived, so the relay is a
    fixed-latency pipe: request/response exchanges pay the RTT, bulk transfers pay it
    once, and the bandwidth is whatever the link (tbf) allows.
    """

    def __init__(self, listen, target, one_way=0.0):
        self.listen = listen
        self.target = target
        self.one_way = one_way
        self.port = None
        self._sock = None
        self._stop = threading.Event()
        self._conns = set()
        self._lock = threading.Lock()

    def start(self):
        self._sock = listening_socket(self.listen, 128)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True, name="delay-relay").start()
        return self

    def stop(self):
        self._stop.set()
        if self._sock:
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _close(conn)

    def _accept_loop(self):
        for client in accepted(self._sock, self._stop):
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _close(client)
            return
        for conn in (client, upstream):
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns.update((client, upstream))
        # The handshake a real link costs: the request reaches the server one RTT later.
        handshake = 2 * self.one_way
        done = [
            threading.Thread(target=self._pump, args=(client, upstream, handshake), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True),
        ]
        for thread in done:
            thread.start()
        for thread in done:
            thread.join()
        with self._lock:
            self._conns.difference_update((client, upstream))
        _close(client)
        _close(upstream)

    def _pump(self, src, dst, first_extra):
        held = queue.Queue(maxsize=QUEUE_CHUNKS)
        writer = threading.Thread(target=self._release, args=(held, src, dst), daemon=True)
        writer.start()
        extra = first_extra
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                held.put((time.monotonic() + self.one_way + extra, data))
                extra = 0.0
        except OSError:
            pass
        held.put(None)
        writer.join()

    @staticmethod
    def _release(held, src, dst):
        while True:
            item = held.get()
            if item is None:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                # The far side is gone: stop the reader too, then drain.
                _close(src)
                while held.get() is not None:
                    pass
                return


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
