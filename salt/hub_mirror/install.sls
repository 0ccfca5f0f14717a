{#- The registry release for this minion's arch, sha256-verified (or the distro package). #}
{%- from tpldir ~ "/map.jinja" import hub_mirror with context %}

hub_mirror-install-registry-installed:
  hub_mirror.installed:
    - name: registry

{%- if hub_mirror.install.method == "package" %}

{#- The distribution's own service would serve its own config on :5000. #}
hub_mirror-install-package-service-dead:
  service.dead:
    - name: {{ hub_mirror.lookup.package_service }}
    - enable: False
    - require:
      - hub_mirror: hub_mirror-install-registry-installed
{%- endif %}
