"""`tandem operator`: run the kopf operator that serves TandemModels, in the namespaces given with
--namespace (repeatable) or in all of them with --all-namespaces, as `kopf run` does."""
from __future__ import annotations

import argparse
import logging


def add_operator_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator for TandemModels",
                       description="Turn every TandemModel into a router, prefill and decode pools and a KV store.")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NAMESPACE",
                       help="serve TandemModels in this namespace (repeatable; globs as in kopf)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve TandemModels in every namespace")
    p.add_argument("--liveness", metavar="URL", help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--image", help="image of the model pods when a TandemModel names none (default: $TANDEM_IMAGE)")
    p.set_defaults(func=cmd_operator)


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    import tandem.operator.handlers  # noqa: F401 - registers the handlers

    kopf.configure(debug=args.log_level == "debug")
    logging.getLogger().setLevel(args.log_level.upper())
    memo = kopf.Memo(default_image=args.image) if args.image else kopf.Memo()
    # one operator at a time (the chart's Deployment): no peering, which would need kopf's own CRDs
    kopf.run(clusterwide=args.all_namespaces, namespaces=args.namespaces or (), standalone=True,
             liveness_endpoint=args.liveness, memo=memo)
    return 0
