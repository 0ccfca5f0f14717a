"""The one way hub_mirror reads, writes and creates files and directories."""

import hashlib
import os
import tempfile

from salt.exceptions import CommandExecutionError


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path, text, mode, uid=-1, gid=-1):
    """Write ``text`` to ``path`` through a same-directory temp file and rename."""
    # Fixed modes whatever the umask: under 077 the service user could not reach its files.
    ensure_dir(os.path.dirname(path), 0o755)
    # surrogateescape: a rollback writes back a file as it was read, UTF-8 or not.
    _replace(path, text, mode, uid, gid, errors="surrogateescape")


def write_exact(path, text, new_mode=0o644):
    """Write ``text`` atomically through a symlink to its target (the link stays), keeping
    an existing file's mode and owner; a new file gets ``new_mode`` whatever the umask."""
    path = os.path.realpath(path)
    try:
        info = os.stat(path)
        mode, uid, gid = info.st_mode & 0o7777, info.st_uid, info.st_gid
    except FileNotFoundError:
        mode, uid, gid = new_mode, -1, -1
    _replace(path, text, mode, uid, gid, errors="strict")


def _replace(path, text, mode, uid, gid, errors):
    """Replace ``path`` with ``text`` (UTF-8, as is) in one rename: a reader sees the old
    file or the new one, never a part; nothing is left behind on failure."""
    data = text.encode("utf-8", errors=errors)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.hub-mirror-")
    try:
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_file(path, strict=False):
    """The text of ``path`` exactly as stored (no newline translation), or None when it
    does not exist. Bytes that are not UTF-8 raise ValueError with ``strict``; otherwise
    they are kept as surrogates, so that a file edited into something else just differs."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    try:
        return data.decode("utf-8", errors="strict" if strict else "surrogateescape")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path, key):
    """An fd of the directory at the resolved ``path``, proven to be that very directory:
    a symlink swapped in anywhere on the way is refused, not followed."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise CommandExecutionError(
            f"{key}: {path} is no longer a directory ({exc.strerror}); nothing was changed in it"
        ) from exc
    if os.readlink(f"/proc/self/fd/{fd}") != path:
        os.close(fd)
        raise CommandExecutionError(
            f"{key}: {path} now leads somewhere else (a directory on the way was replaced by a "
            "symlink); nothing was changed in it. Check who can write its parent directories"
        )
    return fd


def open_below(fd, relative):
    """An fd of ``relative`` under the directory ``fd``, following no symlink; None if it
    is not a directory."""
    current = fd
    try:
        for part in relative.split("/"):
            try:
                following = os.open(part, _DIR_FLAGS, dir_fd=current)
            except OSError:
                return None
            finally:
                if current != fd:
                    os.close(current)
            current = following
        return current
    except BaseException:
        if current != fd:
            os.close(current)
        raise


def ensure_dir(path, mode=0o755):
    """``os.makedirs`` whose parents are traversable whatever the umask (a root umask of
    077 would otherwise lock the service user out of its own storage, and a 0700
    directory breaks every non-root podman/skopeo); return the ones it made, top first."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    made = []
    for index, directory in enumerate(reversed(missing)):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else: theirs, its mode too
        # Through an fd: a chmod by name would follow a symlink swapped in after mkdir.
        fd = os.open(directory, _DIR_FLAGS)
        try:
            os.fchmod(fd, mode if index == len(missing) - 1 else 0o755)
        finally:
            os.close(fd)
        made.append(directory)
    return made


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remove_exact(path):
    """Remove the file ``path`` names; a symlink's target goes, the link stays as the
    user made it (dangling, as it was before hub_mirror wrote through it)."""
    os.unlink(os.path.realpath(path))
