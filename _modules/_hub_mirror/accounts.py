"""
The service account: whose it is (only hub_mirror's own is accepted), its ids, and
how a command runs as it.
"""

import os
import re
import sys

from salt.exceptions import CommandExecutionError

ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

# Groups whose members are as good as root, or read what they must not.
_PRIVILEGED_GROUPS = (
    "adm",
    "disk",
    "docker",
    "kvm",
    "libvirt",
    "lxd",
    "shadow",
    "staff",
    "sudo",
    "systemd-journal",
    "wheel",
)

# The GECOS of the account config.sls creates (user.present fullname).
SERVICE_GECOS = "hub_mirror registry"


def account_problems(user, group):
    """The service user and group own the cache and run the registry: hub_mirror creates
    them, and takes over no account or group that already serves someone else."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    problems = []
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
    # 100-999: Debian's dynamically allocated system accounts (login.defs SYS_UID_MIN/MAX);
    # below are the static ones (daemon, bin, www-data, ...), above are people.
    if account:
        login = os.path.basename(account.pw_shell or "") not in ("nologin", "false")
        # The GECOS is the mark: messagebus, sshd and redis are nologin system accounts with
        # an empty one, and user.present would rewrite their home and shell.
        dedicated = 100 <= account.pw_uid < 1000 and account.pw_gecos == SERVICE_GECOS
        if login or not dedicated:
            kind = "login" if login or account.pw_uid >= 1000 else "system"
            problems.append(("lookup:user", f"{user!r} is an existing {kind} account (uid {account.pw_uid})"))
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        entry = None
    if entry:
        others = set(entry.gr_mem) - {user}
        others |= {p.pw_name for p in pwd.getpwall() if p.pw_gid == entry.gr_gid and p.pw_name != user}
        if entry.gr_gid < 100 or entry.gr_gid >= 1000 or group in _PRIVILEGED_GROUPS or others:
            problems.append(
                (
                    "lookup:group",
                    f"{group!r} is an existing group (gid {entry.gr_gid})"
                    + (f" of {', '.join(sorted(others)[:3])}" if others else ""),
                )
            )
    return problems


def service_ids(conf, required=True):
    """uid and gid of the service user; a clear error (or None) when the user is missing."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    user, group = conf["lookup"]["user"], conf["lookup"]["group"]
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        if not required:
            return None
        raise CommandExecutionError(
            f"hub_mirror:lookup:user: the service user {user!r} or group {group!r} does not "
            "exist; apply hub_mirror.config (it creates them) or create them first"
        ) from exc


def service_user_kwargs(conf):
    """subprocess arguments that run a command as the mirror's service user."""
    if os.geteuid() != 0:
        return {}
    uid, gid = service_ids(conf)
    return {"user": uid, "group": gid, "extra_groups": []}


def service_python():
    # The service user must be able to run it: a Salt venv under /root is not an option.
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
