{#- Undo init.sls in reverse: stop and remove each mirror, then the binary. The cache
    (storage) and the service user stay: set hub_mirror:clean:purge_storage to drop it. #}
{%- from tpldir ~ "/map.jinja" import hub_mirror with context %}


{%- for name in hub_mirror.mirrors %}

hub_mirror-clean-{{ name }}-absent:
  hub_mirror.absent:
    - name: {{ name }}
    - purge_storage: {{ hub_mirror.clean.purge_storage }}
    - require_in:
      - hub_mirror: hub_mirror-clean-registry-uninstalled
{%- endfor %}

hub_mirror-clean-registry-uninstalled:
  hub_mirror.uninstalled:
    - name: registry
