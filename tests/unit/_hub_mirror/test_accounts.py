"""Which existing account hub_mirror may run as (issue 10: an existing system account is
not taken over)."""

import pwd

from _hub_mirror import accounts


def test_an_existing_system_account_with_empty_gecos_is_not_taken_over(monkeypatch):
    # Debian's messagebus, sshd and redis: uid 100-999, nologin, no GECOS. user.present
    # would rewrite their home and shell and hub_mirror would run as them.
    redis = pwd.struct_passwd(("redis", "x", 103, 106, "", "/var/lib/redis", "/usr/sbin/nologin"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: redis if name == "redis" else (_ for _ in ()).throw(KeyError(name)))
    problems = dict(accounts.account_problems("redis", "hub-mirror-test-nogroup"))
    assert "lookup:user" in problems


def test_the_account_hub_mirror_created_is_still_accepted(monkeypatch):
    ours = pwd.struct_passwd(("hub-mirror", "x", 998, 998, "hub_mirror registry", "/nonexistent", "/usr/sbin/nologin"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: ours if name == "hub-mirror" else (_ for _ in ()).throw(KeyError(name)))
    assert not dict(accounts.account_problems("hub-mirror", "hub-mirror-test-nogroup"))
