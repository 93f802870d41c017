"""Reading the rendered manifests of deploy/k8s: render an overlay, find its pods, match selectors."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.k8s import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod", "prod-sidecar")
Obj = dict[str, Any]


def kubectl_render(overlay: str) -> list[Obj] | None:
    """The overlay as `kubectl kustomize` renders it; None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


@functools.cache
def _rendered(overlay: str) -> tuple[Obj, ...]:
    return tuple(kubectl_render(overlay) or kustomize.build(K8S / "overlays" / overlay))


def render(overlay: str) -> list[Obj]:
    """The overlay's objects: kubectl's rendering where kubectl exists, else this project's."""
    import copy

    return copy.deepcopy(list(_rendered(overlay)))


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise LookupError(f"no {kind} {name} among {[(o['kind'], o['metadata']['name']) for o in objects]}")


def workloads(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def containers(workload: Obj) -> list[Obj]:
    spec = workload["spec"]["template"]["spec"]
    found: list[Obj] = spec["containers"] + spec.get("initContainers", [])
    return found


def container(workload: Obj, name: str) -> Obj:
    return next(c for c in containers(workload) if c["name"] == name)


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def tether_toml(objects: list[Obj]) -> dict[str, object]:
    """The overlay's Tether config: tether.toml in its ConfigMap."""
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and
                      o["metadata"]["name"].startswith("tether-config"))
    return tomllib.loads(config_map["data"]["tether.toml"])
