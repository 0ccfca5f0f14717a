{#- The service user and one registry config per mirror, rendered from pillar. #}
{%- from tpldir ~ "/map.jinja" import hub_mirror with context %}

include:
  - .install

hub_mirror-config-group-present:
  group.present:
    - name: {{ hub_mirror.lookup.group }}
    - system: True

hub_mirror-config-user-present:
  user.present:
    - name: {{ hub_mirror.lookup.user }}
    - gid: {{ hub_mirror.lookup.group }}
    - system: True
    - home: /nonexistent
    - createhome: False
    - shell: /usr/sbin/nologin
    - fullname: hub_mirror registry
    - require:
      - group: hub_mirror-config-group-present

{%- for name in hub_mirror.mirrors %}

hub_mirror-config-{{ name }}-configured:
  hub_mirror.configured:
    - name: {{ name }}
    - require:
      - user: hub_mirror-config-user-present
      - hub_mirror: hub_mirror-install-registry-installed
{%- endfor %}
