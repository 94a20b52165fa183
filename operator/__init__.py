"""The Kubernetes operator (kopf): one TandemModel (deploy/crds/tandemmodel.yaml) becomes a router
(the gateway), prefill and decode pools and an optional KV store. `tandem operator` runs it.

spec.py (the spec as pydantic models) -> router.py, pools.py, kvstore.py (pure builders of the
children, assembled by build.py) -> reconcile.py (create or patch them through kube.py) ->
status.py (the status from the children); handlers.py wires these to kopf, groups.py restarts a
multi-pod group as a whole. Never imported as a top-level `operator` (the standard library's)."""
