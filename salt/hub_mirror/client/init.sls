{#- Point this host's container clients at the hub_mirror mirrors listed in
    hub_mirror:client:mirrors, but only at those that answer now: a dead mirror is left
    out (or taken out), and the run still succeeds. map.jinja validates the pillar, so a
    bad one fails the render before anything changes. Salt gives no tplroot: derive it. #}
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import hub_mirror with context %}

hub_mirror-client-clients-configured:
  hub_mirror.client_configured:
    - name: clients
