"""
The hub_mirror credential helper: hands a mirror's upstream credential to registry 3.x.

``hub_mirror.configure`` installs it as
``<prefix>/bin/hub-mirror-credential-helper`` and renders ``proxy.exec.command`` to it for
registry 3.x, which then asks it for the credential (docker-credential-helper protocol:
``get`` with the registry host on stdin; it prints
``{"ServerURL": ..., "Username": ..., "Secret": ...}``) and asks again after
``proxy.exec.lifetime``. A token rotation then rewrites only the credentials file, and the
registry picks the new token up without a restart.

The credentials file (JSON ``{"Username": ..., "Secret": ..., "Site": ...}``, 0600, owned
by the mirror's user) is named by ``HUB_MIRROR_CREDENTIALS``, which the supervisor sets: the
registry passes no arguments to a helper. The registry asks for whatever token realm the
upstream names; the helper answers only for hosts of ``Site`` (the upstream's registrable
domain, or its IP), so an upstream cannot send the token elsewhere.
"""

import json
import os
import sys
import urllib.parse

NOT_FOUND = "credentials not found in native keychain"


def get(server, path):
    """The stored credential; empty strings for an anonymous mirror, which 3.x then
    pulls for as anonymous (an anonymous token, no Authorization)."""
    with open(path, encoding="utf-8") as handle:
        stored = json.load(handle)
    username, secret = stored.get("Username", ""), stored.get("Secret", "")
    if not (isinstance(username, str) and isinstance(secret, str)) or bool(username) != bool(secret):
        raise KeyError(server)
    if username and not of_site(server, stored.get("Site")):
        raise KeyError(server)
    return {"ServerURL": server, "Username": username, "Secret": secret}


def of_site(server, site):
    """Whether ``server`` (``host[:port]``, as the registry writes it) is ``site`` or below it."""
    try:
        host = urllib.parse.urlsplit(f"//{server}").hostname
    except ValueError:
        return False
    return bool(host and isinstance(site, str) and site) and (host == site or host.endswith(f".{site}"))


def main(argv=None, stdin=sys.stdin, stdout=sys.stdout):
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["get"]:
        # store, erase and list make no sense for a credential that pillar owns.
        print(f"hub-mirror-credential-helper: only 'get' is supported, not {argv}", file=sys.stderr)
        return 1
    server = stdin.read().strip()
    path = os.environ.get("HUB_MIRROR_CREDENTIALS", "")
    try:
        credential = get(server, path)
    except (OSError, ValueError, KeyError):
        print(NOT_FOUND, file=stdout)
        return 1
    json.dump(credential, stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
