base:
  '*':
    - hub_mirror
