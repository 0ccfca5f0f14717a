{#- Point this host's container clients at the hub_mirror mirrors listed in
    hub_mirror:client:mirrors, but only at those that answer now: a dead mirror is left
    out (or taken out), and the run still succeeds. With hub_mirror:client:recheck the
    same state keeps a Salt schedule entry that reruns hub_mirror.client_configure, so a
    mirror that dies later is out of every client within that many seconds. map.jinja validates the pillar, so a
    bad one fails the render before anything changes. Salt gives no tplroot: derive it. #}
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import hub_mirror with context %}

hub_mirror-client-clients-configured:
  hub_mirror.client_configured:
    - name: clients
