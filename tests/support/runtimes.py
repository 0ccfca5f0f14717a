"""The client runtimes beyond dockerd, containerd 1.6 and skopeo (tests/support/clients.py):
podman, containerd 2.x with ``ctr``, containerd 2.x's CRI plugin driven by ``crictl``,
and buildkitd with ``buildctl``. Same rules as there: every one runs inside a private
network namespace where ``registry-1.docker.io`` is the stand-in.

containerd 2.x, buildkit and crictl are not in Debian 12: ``.ci/build-go-tools`` builds
them from the Go module proxy into a cache; :func:`go_tools` runs it (it returns at once
when everything is built, and waits for a build ``.ci/run`` started in the background).
Every program is called by absolute path: this machine may have other docker/containerd
builds earlier on PATH.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid

import yaml

from .clients import Containerd, _Daemon
from .saltcall import REPO

GO_TOOLS_SCRIPT = REPO / ".ci" / "build-go-tools"
PODMAN = "/usr/bin/podman"
RUNC = "/usr/sbin/runc"
# A cold build takes many minutes on 2 cores; waiting for one .ci/run started counts too.
GO_TOOLS_TIMEOUT = 3600


def go_tools():
    """The directory holding containerd (2.x), ctr, buildkitd, buildctl and crictl."""
    result = subprocess.run(
        [str(GO_TOOLS_SCRIPT)], capture_output=True, text=True, timeout=GO_TOOLS_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f".ci/build-go-tools failed:\n{result.stderr[-3000:]}")
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


def _run(argv, env, check, timeout):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{argv[-1]!r} and the rest of {argv} exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return result


def blackhole_url(netns, port=5000):
    """A mirror URL whose SYNs vanish: a prefix routed to ``lo`` inside ``netns``. A packet
    for an address no interface holds comes back in on lo and, with forwarding off, is
    dropped without an answer, so a connect hangs until the client gives up. Nothing
    leaves the namespace (it has no other link)."""
    subprocess.run(["ip", "-n", netns.name, "route", "add", "10.255.77.0/24", "dev", "lo"], check=True, timeout=30)
    return f"http://10.255.77.2:{port}"


def podman_pull(netns, image, root, env, binds, check=True, timeout=300):
    """``podman pull`` as root into fresh storage under ``root`` (vfs: no overlay mounts
    needed), so every pull really fetches; /etc/containers (in ``binds``) holds
    registries.conf and its drop-ins."""
    root = pathlib.Path(root) / uuid.uuid4().hex[:8]
    # podman, unlike skopeo, refuses a REGISTRY_AUTH_FILE that does not exist.
    auth = pathlib.Path(env["REGISTRY_AUTH_FILE"])
    if not auth.exists():
        auth.write_text("{}")
        auth.chmod(0o600)
    run_root = pathlib.Path(tempfile.mkdtemp(prefix="hmp-", dir="/tmp"))
    try:
        return _run(
            netns.command(
                [
                    PODMAN, f"--root={root / 'storage'}", f"--runroot={run_root}",
                    "--storage-driver=vfs", "--cgroup-manager=cgroupfs", "--events-backend=file",
                    f"--tmpdir={run_root / 'tmp'}", "pull", "--quiet", image,
                ],
                binds,
            ),
            env, check, timeout,
        )
    finally:
        subprocess.run(["rm", "-rf", str(run_root)], check=False, timeout=60)


class Containerd2(Containerd):
    """containerd 2.x (config version 3) with its own ``ctr``. With ``cri_config_path``
    its CRI plugin runs and reads registry hosts from there, as on a Kubernetes node."""

    def __init__(self, netns, workdir, env, binds, tools, config_file=None, cri_config_path=None):
        super().__init__(netns, workdir, env, binds)
        self.tools = pathlib.Path(tools)
        if config_file:
            self.config = pathlib.Path(config_file)
        self.cri_config_path = cri_config_path

    def config_text(self):
        lines = [
            "version = 3",
            f"root = '{self.workdir / 'root'}'",
            f"state = '{self.run_dir / 'state'}'",
            "[grpc]",
            f"  address = '{self.socket}'",
            "[ttrpc]",
            f"  address = '{self.socket}.ttrpc'",
            "[debug]",
            f"  address = '{self.socket}.debug'",
            "[plugins.'io.containerd.metadata.v1.bolt']",
            "  content_sharing_policy = 'isolated'",
            # ctr 2.x pulls through the transfer service, which unpacks only for the
            # platforms listed here (none when the default snapshotter is not there).
            "[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
            "  platform = 'linux/amd64'",
            "  snapshotter = 'native'",
        ]
        if self.cri_config_path is None:
            lines.insert(3, "disabled_plugins = ['io.containerd.grpc.v1.cri']")
        else:
            lines += [
                "[plugins.'io.containerd.cri.v1.images']",
                "  snapshotter = 'native'",
                "[plugins.'io.containerd.cri.v1.images'.registry]",
                f"  config_path = '{self.cri_config_path}'",
                "[plugins.'io.containerd.cri.v1.runtime'.cni]",
                f"  bin_dirs = ['{self.workdir / 'cni-bin'}']",
                f"  conf_dir = '{self.workdir / 'cni-conf'}'",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout=60):
        self.config.write_text(self.config_text())
        self._spawn([self.tools / "containerd", f"--config={self.config}"])
        self._wait(lambda: self.ctr("version", check=False).returncode == 0, timeout, "containerd 2")
        return self

    def ctr(self, *args, check=True, timeout=300, namespace="hub-mirror"):
        return _run(
            self.netns.command(
                [self.tools / "ctr", f"--address={self.socket}", f"--namespace={namespace}", *args], self.binds
            ),
            self.env, check, timeout,
        )

    def version(self):
        return self.ctr("version").stdout

    def crictl(self, *args, check=True, timeout=300):
        endpoint = f"unix://{self.socket}"
        # crictl insists on a config file (it looks beside itself when this one is missing).
        config = self.workdir / "crictl.yaml"
        config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: {timeout}\n")
        return _run(
            self.netns.command(
                [self.tools / "crictl", f"--config={config}", *args],
                self.binds,
            ),
            self.env, check, timeout + 30,
        )


class Buildkitd(_Daemon):
    """buildkitd with the OCI worker on Debian's runc, its own root and socket, reading
    ``config_file`` (the buildkitd.toml hub_mirror manages) at start."""

    def __init__(self, netns, workdir, env, binds, tools, config_file):
        super().__init__(netns, workdir, env, binds)
        self.tools = pathlib.Path(tools)
        self.config_file = pathlib.Path(config_file)
        self.socket = self.run_dir / "buildkitd.sock"

    def start(self, timeout=60):
        self._spawn(
            [
                self.tools / "buildkitd",
                f"--config={self.config_file}",
                f"--root={self.workdir / 'root'}",
                f"--addr=unix://{self.socket}",
                "--containerd-worker=false",
                "--oci-worker=true",
                f"--oci-worker-binary={RUNC}",
                "--oci-worker-snapshotter=native",
                # The build steps share the test's namespace: it has nothing but lo.
                "--oci-worker-net=host",
            ]
        )
        self._wait(lambda: self.buildctl("debug", "workers", check=False).returncode == 0, timeout, "buildkitd")
        return self

    def buildctl(self, *args, check=True, timeout=300):
        return _run(
            self.netns.command([self.tools / "buildctl", f"--addr=unix://{self.socket}", *args], self.binds),
            self.env, check, timeout,
        )

    def build(self, dockerfile_text, check=True, timeout=300):
        """Build a Dockerfile and export it as an OCI tarball, which makes buildkitd fetch
        every base layer; ``--no-cache`` so that nothing comes from an earlier build."""
        context = self.workdir / f"ctx-{uuid.uuid4().hex[:8]}"
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(dockerfile_text)
        (context / "hello.txt").write_text("built through hub_mirror\n")
        start = time.monotonic()
        result = self.buildctl(
            "build", "--frontend=dockerfile.v0", f"--local=context={context}", f"--local=dockerfile={context}",
            "--no-cache", f"--output=type=oci,dest={context / 'image.tar'}",
            check=check, timeout=timeout,
        )
        result.seconds = time.monotonic() - start
        return result


RECHECK_JOB = "hub_mirror-client-recheck"


def masterless_daemon_config(minion):
    """Let ``minion`` (a :class:`~tests.support.saltcall.Masterless`) also run as a
    salt-minion daemon: no master to look for, and job starts in its log."""
    (minion.conf_dir / "minion.d").mkdir(exist_ok=True)
    (minion.conf_dir / "minion.d" / "masterless.conf").write_text(
        yaml.safe_dump({"master_type": "disable", "log_level_logfile": "info"})
    )


class SaltMinionDaemon(_Daemon):
    """A masterless ``salt-minion`` in the namespace (the schedule's probes must see the
    namespace's mirrors); it runs the recheck schedule entry."""

    def __init__(self, netns, minion):
        super().__init__(netns, minion.root / "daemon", os.environ.copy(), {})
        self.minion = minion

    def start(self, timeout=60):
        self._spawn([pathlib.Path(sys.executable).parent / "salt-minion", "-c", self.minion.conf_dir, "--log-level=quiet"])
        self._wait(lambda: self.runs() > 0, timeout, "salt-minion")
        return self

    def log(self):
        try:
            return self.minion.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def runs(self):
        """How many times the recheck entry has started."""
        return self.log().count("Running scheduled job: " + RECHECK_JOB)
