"""All-or-nothing restart of a StatefulSet group. The members of a tensor/pipeline-parallel group share
one collective, which cannot take a restarted member back: when a member's container restarts or its
pod fails, every member is deleted and the group's StatefulSet starts them again together. (A member
deleted by hand is recreated alone; the others then lose it, fail, and so restart the group.)
LeaderWorkerSets do this themselves (restartPolicy RecreateGroupOnPodRestart)."""
from __future__ import annotations

from tandem.operator.common import COMPONENT_LABEL, GROUP_INDEX_LABEL, MODEL_LABEL, Obj
from tandem.operator.kube import Kube


def member_failed(pod: Obj) -> bool:
    """A live member that failed: pods already going away are the restart under way, not a new failure."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    restarted = any((c.get("restartCount") or 0) > 0 for c in status.get("containerStatuses") or [])
    return status.get("phase") == "Failed" or restarted


def group_selector(pod: Obj) -> dict[str, str]:
    labels = pod["metadata"]["labels"]
    return {key: labels[key] for key in (MODEL_LABEL, COMPONENT_LABEL, GROUP_INDEX_LABEL)}


def restart_group(kube: Kube, pod: Obj) -> list[str]:
    """Delete every live member of `pod`'s group; returns their names."""
    namespace = pod["metadata"]["namespace"]
    members = [p for p in kube.list("v1", "Pod", namespace, group_selector(pod))
               if not p["metadata"].get("deletionTimestamp")]
    for member in members:
        kube.delete("v1", "Pod", namespace, member["metadata"]["name"])
    return [member["metadata"]["name"] for member in members]
