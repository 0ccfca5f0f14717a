{#- The registry release for this minion's arch, sha256-verified; or the distribution's
    package, with the package's own service stopped and disabled. #}
{%- from tpldir ~ "/map.jinja" import hub_mirror with context %}

hub_mirror-install-registry-installed:
  hub_mirror.installed:
    - name: registry
