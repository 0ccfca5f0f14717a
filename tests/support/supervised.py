"""A mirror run the way its service runs it, without Salt: the real supervisor program
(``_hub_mirror/programs/supervise.py``) with the registry and, unless told otherwise, the
front (Debian's nginx), as the service user, on the files the library renders for the
mirror. For benchmarks, which run mirrors inside network namespaces that an apply
cannot reach, and which compare the mirror with and without its front."""

import json
import os
import pwd
import subprocess
from pathlib import Path

from tests.support.modules import exec_module, lib, program
from tests.support.netutil import clean_env, wait_http
from tests.support.processes import cpu_seconds, pids, stat_fields, stop_group

SERVICE_USER = "hub-mirror"
NGINX = "/usr/sbin/nginx"


def service_account():
    """(uid, gid) of the service user, created (as Salt's state would) when missing."""
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
        )
        entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def chown_tree(path, uid, gid):
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)
    os.lchown(path, uid, gid)


class SupervisedMirror:
    """The mirror ``name`` of pillar ``mirror`` at registry ``version``, run from
    ``workdir`` (which the service user must be able to traverse) with ``binary``."""

    def __init__(self, workdir, name, mirror, version, binary, front=True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        pillar = {**mirror, "front": "nginx" if front else "none"}
        _, self.spec = exec_module({"version": version, "mirrors": {name: pillar}})._mirror(name, redact=False)  # pylint: disable=protected-access
        self.front = front
        self.version = version
        self.binary = str(binary)
        self.storage = Path(self.spec["storage"])
        self.hostport = f"{self.spec['listen_host']}:{self.spec['listen_port']}"
        self.url = f"http://{self.hostport}"
        self.log_path = self.workdir / "supervise.log"
        self.proc = None
        self._write_files()

    def _write_files(self):
        dialect = lib("settings").dialect_of(self.version)
        config_lib = lib("registry_config")
        paths = {key: self.workdir / name for key, name in (
            ("config", "config.yml"), ("offline_config", "offline.yml"), ("credentials", "credentials.json"),
            ("helper", "credential-helper"), ("front_conf", "front.conf"), ("settings", "supervise.json"),
        )}
        config = config_lib.render_config(self.spec, dialect, str(paths["helper"]))
        texts = {
            "config": config_lib._config_text(self.spec["name"], config),  # pylint: disable=protected-access
            "offline_config": config_lib._config_text(self.spec["name"], config_lib.render_offline_config(config)),  # pylint: disable=protected-access
            "credentials": config_lib.credentials_text(self.spec),
            "helper": lib("supervisor").program_text("credential_helper.py"),
        }
        if self.front:
            texts["front_conf"] = lib("front").render_conf(self.spec)
        settings = {
            "binary": self.binary,
            "config": str(paths["config"]),
            "offline_config": str(paths["offline_config"]),
            "listen": self.hostport,
            "upstream": self.spec["upstream"],
            "credentials": str(paths["credentials"]),
            "storage": str(self.storage),
            "front_binary": NGINX if self.front else "",
            "front_conf": str(paths["front_conf"]) if self.front else "",
            "front_dir": str(self.storage / lib("front").FRONT_DIR) if self.front else "",
            "socket": lib("front").SOCKET if self.front else "",
        }
        texts["settings"] = json.dumps(settings)
        uid, gid = service_account()
        for key, text in texts.items():
            paths[key].write_text(text)
            os.chown(paths[key], uid, gid)
            os.chmod(paths[key], 0o700 if key == "helper" else 0o600)
        self.settings_path = paths["settings"]

    def start(self, timeout=30):
        uid, gid = service_account()
        self.storage.mkdir(parents=True, exist_ok=True)
        chown_tree(self.storage, uid, gid)
        log = open(self.log_path, "ab")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            ["/usr/bin/python3", str(program("supervise")), str(self.settings_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            user=uid,
            group=gid,
            extra_groups=[],
            umask=0o027,
            start_new_session=True,
        )
        log.close()
        try:
            wait_http(self.url + "/v2/", timeout=timeout, ok=(200, 401))
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- supervise log ---\n{self.log_path.read_text(errors='replace')[-3000:]}") from None
        return self

    def cpu(self):
        """CPU seconds of the supervisor and every process under it: the registry, and
        nginx's master and workers (a process group of their own)."""
        family, found = {self.proc.pid}, True
        while found:
            found = {pid for pid in pids() if pid not in family and int((stat_fields(pid) or [0, 0])[1]) in family}
            family |= found
        return sum(cpu_seconds(pid) or 0.0 for pid in family)

    def stop(self):
        if self.proc is not None:
            stop_group(self.proc, 30)
