"""host:port parsing and URLs in messages that never show credentials."""

import pytest

from _hub_mirror import net

TOKEN = "dckr_pat_UNIT0123456789abcdefXYZ"
USER = "hubuser"


@pytest.mark.parametrize(
    "url,shown",
    [
        ("https://registry-1.docker.io", "https://registry-1.docker.io"),
        (f"https://{USER}:{TOKEN}@host:5000", "https://<redacted>@host:5000"),
        (f"ftp://{USER}:{TOKEN}@host/path", "ftp://<redacted>@host/path"),
        (f"https://{USER}:a/b{TOKEN}@host", "https://<redacted>@host"),
        (f"{USER}:{TOKEN}@host", "<redacted>"),
        (5000, 5000),
    ],
)
def test_urls_in_messages_never_show_credentials(url, shown):
    assert net.redact_url(url) == shown


@pytest.mark.parametrize(
    "text,parsed",
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("[::1]:5000", ("::1", 5000)),
        ("eth0:65535", ("eth0", 65535)),
        (" localhost:1 ", ("localhost", 1)),
    ],
)
def test_hostport_parses(text, parsed):
    assert net.parse_hostport(text) == parsed


@pytest.mark.parametrize("text", ["5000", ":5000", "host:", "host:0", "host:65536", "host:50x", "[::1]5000", ""])
def test_hostport_refuses(text):
    with pytest.raises(ValueError):
        net.parse_hostport(text)
