{#- Undo hub_mirror.client: every client config file it touched gets its owner's version
    back (original bytes, or the file without hub_mirror's part if edited since), and
    the recheck schedule entry goes, so that no later run puts a mirror back. #}
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import hub_mirror with context %}

hub_mirror-client-clean-clients-absent:
  hub_mirror.client_absent:
    - name: clients
