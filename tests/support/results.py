"""What a Salt run returns, read one way for every runner: ``salt-call --local``
(:mod:`.saltcall`), the ``salt`` CLI in a test namespace (:mod:`.sysmaster`) and
salt-factories' CLI (:mod:`.saltmaster`, whose results carry ``.data`` too)."""


def states_of(data):
    """{state id: return} of a state run; {} when it did not render (data is then a list
    of errors, or None)."""
    if not isinstance(data, dict):
        return {}
    return {key.split("_|-")[1]: value for key, value in data.items()}


def changes_of(data):
    """{state id: changes} of the states of a run that changed something."""
    return {sid: ret["changes"] for sid, ret in states_of(data).items() if ret["changes"]}


class StateResult:
    """One Salt CLI call. Subclasses set ``returncode``, ``stdout``, ``stderr`` and
    ``data`` (the minion's return parsed from ``--out=json``, None when there is none)."""

    returncode = None
    stdout = stderr = ""
    data = None

    @property
    def output(self):
        """stdout and stderr together: what a user sees, and where no secret may be."""
        return self.stdout + self.stderr

    @property
    def states(self):
        """{state id: return} of a state run; {} when it did not render."""
        return states_of(self.data)

    @property
    def changes(self):
        """{state id: changes} of the states that changed something."""
        return changes_of(self.data)

    @property
    def all_true(self):
        """The run rendered and every one of its states succeeded."""
        return bool(self.states) and all(ret["result"] is True for ret in self.states.values())
