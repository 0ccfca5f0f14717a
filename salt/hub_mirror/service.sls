{#- Each mirror supervised (systemd, or an init script where systemd is not PID 1),
    restarted only on change, and proven to answer /v2/. A mirror dropped from pillar is
    stopped and removed (its cache stays), and no other mirror is touched. #}
{%- from tpldir ~ "/map.jinja" import hub_mirror with context %}

include:
  - .config

{%- for name in hub_mirror.mirrors %}

hub_mirror-service-{{ name }}-running:
  hub_mirror.running:
    - name: {{ name }}
    - require:
      - hub_mirror: hub_mirror-config-{{ name }}-configured
{%- endfor %}

{%- for name in salt["hub_mirror.orphans"]() %}

hub_mirror-service-{{ name }}-absent:
  hub_mirror.absent:
    - name: {{ name }}
{%- endfor %}
