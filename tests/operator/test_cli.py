"""`tandem operator`: its scope flags, as the Helm chart passes them."""
from __future__ import annotations

import pytest

from tandem.cli import parse_args


def test_the_operator_command_line():
    _, args = parse_args(["operator", "--namespace=team-a", "--namespace=team-b", "--log-level=warning",
                          "--liveness=http://0.0.0.0:8080/healthz"])
    assert (args.namespaces, args.all_namespaces, args.log_level) == (["team-a", "team-b"], False, "warning")
    assert parse_args(["operator", "-A"])[1].all_namespaces
    for wrong in (["operator"], ["operator", "-A", "-n", "x"]):  # a scope is needed, and only one
        with pytest.raises(SystemExit):
            parse_args(wrong)
