"""Real container clients (dockerd, containerd + ctr, skopeo) in a private network namespace.

Each of these clients falls back to Docker Hub on its own when a mirror fails, so they
only ever run inside a network namespace that has nothing but ``lo``, together with the
Docker Hub stand-in and the mirror. Inside it, ``registry-1.docker.io`` is the stand-in:
a private ``/etc/hosts`` maps Docker Hub's names to 127.0.0.1 and :class:`TLSFront`
serves the stand-in with TLS on port 443, under a throwaway CA the clients trust through
``SSL_CERT_FILE``. So the clients' real fallback path (mirror down -> registry-1.docker.io)
is exercised, and nothing can leave the machine.

Servers written in Python (the stand-in, the TLS front) and the registry processes are
started by a thread that has entered the namespace (:meth:`NetNS.entered`): sockets and
child processes keep the namespace they were created in. Client programs are started
through :meth:`NetNS.command`, which also gives them a private mount namespace with the
bind mounts they need (``/etc/hosts``, ``/etc/containers``) and leaves ``/sys`` (and
the cgroups dockerd needs) as they are, unlike ``ip netns exec``.
"""

import contextlib
import ctypes
import datetime
import json
import os
import pathlib
import select
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid

from .netutil import accepted, clean_env, listening_socket
from .processes import stop_group

CLONE_NEWNET = 0x40000000
DOCKER_HUB_NAMES = ("registry-1.docker.io", "docker.io", "index.docker.io", "auth.docker.io")
DOCKER_CLI = "/usr/bin/docker"  # Debian's, matching the daemon (not whatever PATH finds first)
STOP_GRACE_SECONDS = 20

_libc = ctypes.CDLL(None, use_errno=True)

# Run the program after bind-mounting pairs of paths, in the caller's new mount namespace.
_BIND_AND_EXEC = 'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 97; shift 2; done; shift; exec "$@"'


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNS:
    """A named network namespace with only ``lo`` up (``ip netns add``)."""

    def __init__(self, prefix="hmc"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.path = f"/run/netns/{self.name}"

    def create(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=30)
        links = subprocess.run(
            ["ip", "-n", self.name, "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()
        if [line.split(":")[1].strip() for line in links] != ["lo"]:
            self.delete()
            raise RuntimeError(f"namespace {self.name} has more than lo: {links}")
        return self

    def delete(self):
        subprocess.run(["ip", "netns", "delete", self.name], check=False, timeout=30, capture_output=True)

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc_info):
        self.delete()

    @property
    def inode(self):
        return os.stat(self.path).st_ino

    def holds(self, pid):
        """True when process ``pid`` lives in this namespace."""
        return os.stat(f"/proc/{pid}/ns/net").st_ino == self.inode

    @contextlib.contextmanager
    def entered(self):
        """Move the calling thread into the namespace for the block, then back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def command(self, argv, binds=None):
        """``argv`` run in this namespace with a private mount namespace where each
        ``{target: source}`` of ``binds`` is bind-mounted."""
        pairs = [part for target, source in (binds or {}).items() for part in (str(source), str(target))]
        return [
            "nsenter", f"--net={self.path}",
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", _BIND_AND_EXEC, "hm-netns", *pairs, "--", *map(str, argv),
        ]


def make_hub_identity(directory):
    """A self-signed certificate for Docker Hub's names and 127.0.0.1 (its own CA).

    Returns (certificate path, key path); the certificate is what clients trust.
    """
    import ipaddress  # pylint: disable=import-outside-toplevel

    from cryptography import x509  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
    from cryptography.x509.oid import NameOID  # pylint: disable=import-outside-toplevel

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub_mirror test Docker Hub")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in DOCKER_HUB_NAMES]
                + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "hub.crt", directory / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class TLSFront:
    """TLS on 127.0.0.1:``port`` in front of a plain-HTTP server on 127.0.0.1:``target_port``.

    Create and start it from a thread inside the namespace it should serve.
    """

    def __init__(self, target_port, cert, key, port=443):
        self.target_port = target_port
        self.port = port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.context.set_alpn_protocols(["http/1.1"])
        self.connections = 0
        self._sock = None
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._sock = listening_socket(("127.0.0.1", self.port), 64)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"tlsfront-{self.port}")
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._sock:
            self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _accept_loop(self):
        for conn in accepted(self._sock, self._stop):
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(30)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            tls.close()
            return
        deadline = time.monotonic() + 300
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                # Bytes already decrypted inside the TLS object do not wake select().
                readable = [tls] if tls.pending() else select.select([tls, upstream], [], [], 0.5)[0]
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is tls else tls).sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            upstream.close()
            tls.close()


def run_client(argv, env, timeout, check=True):
    """Run a client program, its output captured as text; with ``check``, a non-zero
    exit raises CalledProcessError, which carries that output."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=check)


def client_etc(directory, policy=True):
    """Files the clients see in place of the host's: an /etc/hosts mapping Docker Hub to
    127.0.0.1 and an /etc/containers with an empty v2 registries.conf."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(DOCKER_HUB_NAMES) + "\n::1 localhost\n")
    containers = directory / "containers"
    (containers / "registries.conf.d").mkdir(parents=True, exist_ok=True)
    (containers / "registries.conf").write_text("# hub_mirror tests: v2 format, no registries\n")
    if policy:
        (containers / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return hosts, containers


def client_env(workdir, ca_file):
    """Environment for a client: trust only the stand-in's CA, no proxies, no host creds."""
    home = pathlib.Path(workdir) / "home"
    home.mkdir(parents=True, exist_ok=True)
    return clean_env(
        {
            "SSL_CERT_FILE": str(ca_file),
            "SSL_CERT_DIR": str(home),
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(home),
            "XDG_CONFIG_HOME": str(home),
            "DOCKER_CONFIG": str(home),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        }
    )


class _Daemon:
    """A daemon in its own process group, started through NetNS.command."""

    def __init__(self, netns, workdir, env, binds):
        self.netns = netns
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.binds = binds
        self.log_path = self.workdir / f"{type(self).__name__.lower()}.log"
        # Unix socket paths must stay under 108 bytes: pytest's tmp paths are too long.
        self.run_dir = pathlib.Path(tempfile.mkdtemp(prefix="hmc-", dir="/tmp"))
        self.proc = None

    def _spawn(self, argv):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.netns.command(argv, self.binds),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{what} not ready after {timeout}s:\n{self.log_tail()}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def log_tail(self, lines=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self):
        """Stop the daemon's process group and drop its run directory."""
        if self.proc is not None:
            stop_group(self.proc, STOP_GRACE_SECONDS)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class Dockerd(_Daemon):
    """Debian's dockerd with its own exec root, pidfile and socket; everything else
    (data-root, storage driver, no iptables, no bridge) comes from ``config_file``, the
    daemon.json hub_mirror manages, so that no flag conflicts with it."""

    def __init__(self, netns, workdir, config_file, env, binds):
        super().__init__(netns, workdir, env, binds)
        self.config_file = pathlib.Path(config_file)
        self.pidfile = self.workdir / "docker.pid"
        self.socket = self.run_dir / "docker.sock"

    @staticmethod
    def base_config(data_root):
        """daemon.json keys a test dockerd needs: nothing on the host network or disk."""
        return {
            "data-root": str(data_root),
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "bridge": "none",
        }

    def start(self, *extra_args, timeout=60):
        self._spawn(
            [
                "dockerd",
                f"--exec-root={self.run_dir / 'exec'}",
                f"--pidfile={self.pidfile}",
                f"--host=unix://{self.socket}",
                f"--config-file={self.config_file}",
                *extra_args,
            ]
        )
        self._wait(lambda: self.docker("version", check=False).returncode == 0, timeout, "dockerd")
        return self

    def docker(self, *args, check=True, timeout=180):
        """The docker CLI against this dockerd (outside the namespace: it talks to the socket)."""
        return run_client([DOCKER_CLI, f"--host=unix://{self.socket}", *args], self.env, timeout, check)

    def info(self):
        return json.loads(self.docker("info", "--format", "{{json .}}").stdout)

    def mirrors(self):
        return self.info()["RegistryConfig"].get("Mirrors") or []

    def wait_mirrors(self, expected, timeout=15):
        """Wait until a reload shows ``expected`` mirrors; return what dockerd reports."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [m.rstrip("/") for m in self.mirrors()]
            if seen == expected or time.monotonic() >= deadline:
                return seen
            time.sleep(0.2)

    def pull(self, image):
        return self.docker("pull", "--quiet", image)

    def remove_image(self, image):
        self.docker("rmi", "--force", image, check=False)


class Containerd(_Daemon):
    """containerd with its own root, state and socket, the CRI plugin off; ``ctr`` pulls
    into a fresh namespace each time and, with content sharing off, really fetches."""

    def __init__(self, netns, workdir, env, binds):
        super().__init__(netns, workdir, env, binds)
        self.socket = self.run_dir / "containerd.sock"
        self.config = self.workdir / "config.toml"

    def start(self, timeout=30):
        self.config.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.workdir / "root"}"',
                    f'state = "{self.run_dir / "state"}"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.socket}"',
                    "[ttrpc]",
                    f'  address = "{self.socket}.ttrpc"',
                    "[debug]",
                    f'  address = "{self.socket}.debug"',
                    '[plugins."io.containerd.internal.v1.opt"]',
                    f'  path = "{self.workdir / "opt"}"',
                    '[plugins."io.containerd.metadata.v1.bolt"]',
                    '  content_sharing_policy = "isolated"',
                    "",
                ]
            )
        )
        self._spawn(["containerd", f"--config={self.config}"])
        self._wait(lambda: self.ctr("version", check=False).returncode == 0, timeout, "containerd")
        return self

    def ctr(self, *args, check=True, timeout=180, namespace="hub-mirror"):
        """``ctr`` against this containerd, in the namespace, in containerd namespace ``namespace``."""
        argv = ["ctr", f"--address={self.socket}", f"--namespace={namespace}", *args]
        return run_client(self.netns.command(argv, self.binds), self.env, timeout, check)

    def pull(self, image, hosts_dir, check=True):
        """``ctr images pull --hosts-dir`` into a namespace of its own (nothing cached)."""
        return self.ctr(
            "images", "pull", "--snapshotter=native", f"--hosts-dir={hosts_dir}", image,
            check=check, namespace=f"pull-{uuid.uuid4().hex[:8]}",
        )


def skopeo_copy(netns, image, dest_dir, env, binds, check=True, timeout=180):
    """``skopeo copy docker://IMAGE oci:DEST`` in the namespace; /etc/containers (in
    ``binds``) holds the registries.conf and drop-ins it reads."""
    argv = [
        "skopeo", "--override-arch=amd64", "--override-os=linux",
        "copy", "--retry-times=0", "--quiet",
        f"docker://{image}", f"oci:{dest_dir}:pulled",
    ]
    return run_client(netns.command(argv, binds), env, timeout, check)


def timed(function, *args, **kwargs):
    """(seconds, result) of one call."""
    start = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - start, result
