{#- Keep each mirror's pillar `warm` list cached and its storage under `max_size`.
    Not part of init.sls: warming needs the upstream, so schedule it on its own
    (e.g. `salt 'cache*' state.apply hub_mirror.cache` from cron or the scheduler). #}
{%- from tpldir ~ "/map.jinja" import hub_mirror with context %}

include:
  - .service

{%- for name, mirror in hub_mirror.mirrors.items() %}
{%-   if mirror.warm %}

hub_mirror-cache-{{ name }}-warmed:
  hub_mirror.warmed:
    - name: {{ name }}
    - require:
      - hub_mirror: hub_mirror-service-{{ name }}-running
{%-   endif %}
{%-   if mirror.max_size %}

hub_mirror-cache-{{ name }}-pruned:
  hub_mirror.pruned:
    - name: {{ name }}
    - require:
      - hub_mirror: hub_mirror-service-{{ name }}-running
{%-   endif %}
{%- endfor %}
