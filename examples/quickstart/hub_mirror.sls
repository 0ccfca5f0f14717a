# The quick start's pillar: one anonymous Docker Hub mirror on loopback, from the
# distribution's package so that it works on a machine that reaches only Debian's package
# registry. A production pillar differs (see pillar.example):
#   - install: method: archive (the default) with version '3.0.0': the upstream release,
#     sha256-verified, for each minion's arch;
#   - username and token: a Docker Hub access token (a higher pull limit than anonymous,
#     per account instead of per IP; hub_mirror.ratelimit shows the live one), kept in
#     encrypted pillar (GPG renderer or an external pillar), never in a plain file;
#   - listen on the address the build hosts or VMs reach, e.g. 192.168.128.1:5000.
hub_mirror:
  install:
    method: package
  mirrors:
    dockerhub:
      upstream: https://registry-1.docker.io
      listen: 127.0.0.1:5000
