"""
The record of every client file hub_mirror touched (original bytes, what it wrote),
and planning and applying a change to one such file.
"""

import hashlib
import json
import os

from ..fsutil import (
    ensure_dir,
    read_file,
    remove_exact,
    sha256_text,
    write_atomic,
    write_exact,
)
from .render import (
    BLOCK_BEGIN,
    BLOCK_END,
    BLOCK_KINDS,
    CLIENT_KINDS,
    buildkitd_conflict,
    hosts_toml_conflict,
    remember_daemon_json,
    strip_block,
)
from .validate import CLIENT_RUNTIMES


class ClientRecord:
    """What hub_mirror did to client config files, kept under ``<state_dir>/.client`` (0700).

    Per file (the three ways of owning its bytes): ``existed`` and the user's own version
    in ``originals/`` (0600), a digest of what hub_mirror ``written`` last, and the
    ``mirrors`` in it; what is there now is read at each run. An entry is added only after
    its file was written. A record that is unreadable or incomplete is repaired when
    loaded (what is lost is said in ``repaired``), never fatal.
    """

    def __init__(self, directory):
        self.directory = directory
        self.index_path = os.path.join(directory, "index.json")
        self.repaired = []
        self.dirty = False
        self.corrupt = False
        try:
            with open(self.index_path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            self.corrupt = True
            self.repaired.append(
                f"{self.index_path} was unreadable ({exc}): started afresh, the old one is kept "
                "as index.json.corrupt; hub_mirror's marked blocks are still found by their markers"
            )
            self.dirty = True
            raw = {}
        files = raw.get("files") if isinstance(raw, dict) else None
        self.files = {}
        for path, entry in (files if isinstance(files, dict) else {}).items():
            fixed = self._repair(path, entry)
            if fixed is None:
                self.repaired.append(f"dropped the unusable record of {path}")
                self.dirty = True
            else:
                self.files[path] = fixed

    def _repair(self, path, entry):
        if not isinstance(path, str) or not os.path.isabs(path) or not isinstance(entry, dict):
            return None
        if entry.get("runtime") not in CLIENT_RUNTIMES:
            return None
        fixed = dict(entry)
        if not isinstance(fixed.get("existed"), bool):
            fixed["existed"] = os.path.exists(self._original_path(path))
        if not isinstance(fixed.get("written"), str):
            # E.g. an entry left by a write that failed: what is there now is not ours.
            fixed["written"] = None
        mirrors = fixed.get("mirrors")
        if not isinstance(mirrors, dict) or not all(
            isinstance(urls, list) and all(isinstance(url, str) for url in urls) for urls in mirrors.values()
        ):
            fixed["mirrors"] = {}
        if not isinstance(fixed.get("dirs"), list) or not all(isinstance(d, str) for d in fixed["dirs"]):
            fixed["dirs"] = []
        if fixed != entry:
            self.repaired.append(f"repaired the record of {path}")
            self.dirty = True
        return fixed

    def _original_path(self, path):
        return os.path.join(self.directory, "originals", hashlib.sha256(path.encode()).hexdigest())

    def original(self, path):
        try:
            return read_file(self._original_path(path), strict=True)
        except (OSError, ValueError):
            return None

    def keep_original(self, path, text):
        """Keep ``text`` as the user's own version of ``path`` (None: they have none)."""
        saved = self._original_path(path)
        if text is None:
            try:
                os.unlink(saved)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(saved), mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        write_exact(saved, text, new_mode=0o600)

    def forget(self, path):
        self.files.pop(path, None)
        self.keep_original(path, None)
        self.dirty = True

    def save(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if self.corrupt and os.path.isfile(self.index_path):
            os.replace(self.index_path, self.index_path + ".corrupt")
        self.corrupt = False
        write_atomic(self.index_path, json.dumps({"files": self.files}, indent=2) + "\n", 0o600)
        self.dirty = False


_CONFLICTS = {"hosts_toml": hosts_toml_conflict, "buildkitd_toml": buildkitd_conflict}


def plan_file(kind, entry, current, original, mirrors, **render_args):
    """
    The user's own version of one client config file and the text it should hold:
    ``(base, desired, note)``; None for a file that should not exist. Pure.

    ``entry`` is the record of the file (None: hub_mirror never wrote it), ``current``
    its text now, ``original`` the user's version kept in the record. Three-way: a file
    still exactly as hub_mirror wrote it has the kept version as its base; one the user
    changed since has what is there now minus hub_mirror's part, so the user's edits
    stay, now and on clean.
    """
    render, strip = CLIENT_KINDS[kind]
    if entry is None:
        # A marked block is ours by its markers, even when its record was lost; a file
        # that holds nothing else was created by hub_mirror.
        base = strip_block(current) if kind in BLOCK_KINDS and current else current
        if kind in BLOCK_KINDS and current and not base:
            base = None
    elif current is None:
        base = None
    elif entry.get("written") == sha256_text(current) and (original is not None or not entry["existed"]):
        base = original if entry["existed"] else None
    else:
        base = strip(current, entry)
    note = None
    if mirrors and kind in _CONFLICTS and strip_block(base):
        conflict = _CONFLICTS[kind](strip_block(base), mirrors)
        if conflict:
            mirrors, note = {}, conflict
    desired = render(base, mirrors, **render_args) if mirrors else base
    separated = bool(base)
    if kind in BLOCK_KINDS and entry is not None and current and desired and block_span(current):
        # Where the user wrote around hub_mirror's block, the block stays where it is.
        desired = _splice_block(current, desired)
        separated = entry.get("separated", True)
    return base, desired, mirrors, note, separated


def read_marked(path):
    """A client file's text if it may hold a block of ours, else ""."""
    try:
        return read_file(path, strict=True) or ""
    except (OSError, ValueError):
        return ""


def block_span(text):
    """(start, end) of hub_mirror's marked block in ``text``, or None."""
    begin = (text or "").find(BLOCK_BEGIN + "\n")
    if begin < 0 or (begin > 0 and text[begin - 1] != "\n"):
        return None
    end = text.find(BLOCK_END + "\n", begin)
    return None if end < 0 else (begin, end + len(BLOCK_END) + 1)


def _splice_block(current, rendered):
    """``current`` with its marked block replaced by the one in ``rendered``."""
    old, new = block_span(current), block_span(rendered)
    if not old or not new:
        return rendered
    return current[: old[0]] + rendered[new[0] : new[1]] + current[old[1] :]


def apply_file(record, runtime, path, kind, plan, current, test):
    """Write one planned file; record it only once the write succeeded. Returns the
    change, or None when the file is already right."""
    base, desired, mirrors, separated = plan
    entry = record.files.get(path)
    if entry is None and not mirrors:
        if kind not in BLOCK_KINDS or desired == current:
            return None, []
        # A block of ours whose record was lost: found by its markers, it comes out (a
        # dead mirror must not stay); what is left is the user's and stays unrecorded.
        if not test:
            if desired is None:
                remove_exact(path)
            else:
                write_exact(path, desired)
        return {"old": "a hub_mirror block with no record", "new": {}}, []
    change = (
        None
        if desired == current
        else {"old": (entry or {}).get("mirrors", {}) if current is not None else {}, "new": mirrors}
    )
    if test:
        return change, []
    kept = record.original(path) if entry is not None and entry["existed"] else None
    if entry is None or base != kept or (base is None) == entry["existed"]:
        # The user's version changed (first touch, or they edited the file): keep it
        # before the file changes, so that no failure later can lose it.
        try:
            record.keep_original(path, base)
        except OSError as exc:
            raise OSError(exc.errno, f"its original could not be kept in {record.directory}: {exc.strerror}") from exc
    dirs = list((entry or {}).get("dirs", []))
    emptied = []
    if desired != current:
        if desired is None:
            remove_exact(path)
            emptied = dirs
        else:
            dirs += ensure_dir(os.path.dirname(os.path.realpath(path)))
            write_exact(path, desired)
    if mirrors and desired is not None:
        new_entry = {
            "runtime": runtime,
            "existed": base is not None,
            "dirs": dirs,
            "mirrors": mirrors,
            "written": sha256_text(desired),
        }
        if kind == "daemon_json":
            new_entry.update(remember_daemon_json(base))
        elif kind in BLOCK_KINDS:
            # Whether add_block put a newline between the user's text and the block.
            new_entry["separated"] = separated
        if new_entry != entry:
            record.files[path] = new_entry
            record.dirty = True
    elif entry is not None:
        record.forget(path)
        if desired is not None:
            emptied = []
    return change, emptied
