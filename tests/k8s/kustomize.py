"""A small kustomize: renders deploy/k8s on machines without `kubectl kustomize`.

It does what Tether's kustomizations use and nothing else: resources (files and
directories), components, namespace, configMapGenerator and secretGenerator (files and
literals, a content-hash name suffix, references rewritten), images, replicas, and
strategic-merge patches aimed by kind and name. A field it does not know raises, so a
kustomization that grows past it fails here instead of rendering something other than
kubectl would. Where kubectl exists, the tests check both render the same objects.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "configMapGenerator",
                "secretGenerator", "images", "replicas", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
# Lists that strategic merge patches merge item by item, and the key that matches items.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "topologySpreadConstraints": "topologyKey",
              "imagePullSecrets": "name"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
HASH_ALPHABET = str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"})  # as kustomize's suffixes look
GENERATED_SUFFIX = re.compile(r"^(?P<base>.+)-[bcdfghjkmnpqrstvwxz2456789]{10}$")


class KustomizeError(Exception):
    pass


def build(directory: Path) -> list[Obj]:
    """Render the kustomization in `directory`, as `kubectl kustomize DIRECTORY` would."""
    renames: dict[tuple[str, str], str] = {}
    objects = _build(directory, [], renames)
    for obj in objects:
        _rename_references(obj, renames)
    return objects


def _build(directory: Path, objects: list[Obj], renames: dict[tuple[str, str], str]) -> list[Obj]:
    spec = _kustomization(directory)
    for entry in spec.get("resources", []):
        path = directory / entry
        objects.extend(_build(path, [], renames) if path.is_dir() else list(_documents(path)))
    for entry in spec.get("components", []):
        objects = _build(directory / entry, objects, renames)
    for generator in spec.get("configMapGenerator", []):
        objects.append(_generate("ConfigMap", directory, generator, renames))
    for generator in spec.get("secretGenerator", []):
        objects.append(_generate("Secret", directory, generator, renames))
    for patch in spec.get("patches", []):
        for document in _patch_documents(directory, patch):
            _apply_patch(objects, document)
    for image in spec.get("images", []):
        _set_image(objects, image)
    for replicas in spec.get("replicas", []):
        _target(objects, None, replicas["name"], WORKLOADS)["spec"]["replicas"] = replicas["count"]
    if namespace := spec.get("namespace"):
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = namespace
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def _kustomization(directory: Path) -> Obj:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"Cannot build {directory}: no kustomization.yaml")
    spec: Obj = yaml.safe_load(path.read_text())
    if unknown := set(spec) - KNOWN_FIELDS:
        raise KustomizeError(f"Cannot build {path}: this renderer does not know {', '.join(sorted(unknown))}")
    return spec


def _documents(path: Path) -> Iterator[Obj]:
    for document in yaml.safe_load_all(path.read_text()):
        if document is not None:
            yield document


def _generate(kind: str, directory: Path, generator: Obj, renames: dict[tuple[str, str], str]) -> Obj:
    if unknown := set(generator) - {"name", "files", "literals", "type"}:
        raise KustomizeError(f"Cannot generate {generator.get('name')}: unknown {', '.join(sorted(unknown))}")
    data: dict[str, str] = {}
    for entry in generator.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    for entry in generator.get("files", []):
        key, _, file = entry.rpartition("=") if "=" in entry else ("", "", entry)
        data[key or Path(file).name] = (directory / file).read_text()
    name = generator["name"]
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
    if kind == "Secret":
        obj["type"] = generator.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    obj["metadata"]["name"] = renames[(kind, name)] = f"{name}-{digest[:10].translate(HASH_ALPHABET)}"
    return obj


def _rename_references(obj: Obj, renames: dict[tuple[str, str], str]) -> None:
    """Point a workload's volumes and environment at the generated names."""
    pod = _pod_spec(obj)
    if pod is None:
        return
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            _rename(volume["configMap"], "name", "ConfigMap", renames)
        if "secret" in volume:
            _rename(volume["secret"], "secretName", "Secret", renames)
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if "configMapKeyRef" in source:
                _rename(source["configMapKeyRef"], "name", "ConfigMap", renames)
            if "secretKeyRef" in source:
                _rename(source["secretKeyRef"], "name", "Secret", renames)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                _rename(source["configMapRef"], "name", "ConfigMap", renames)
            if "secretRef" in source:
                _rename(source["secretRef"], "name", "Secret", renames)


def _rename(holder: Obj, field: str, kind: str, renames: dict[tuple[str, str], str]) -> None:
    holder[field] = renames.get((kind, holder[field]), holder[field])


def _pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in WORKLOADS:
        spec: Obj = obj["spec"]["template"]["spec"]
        return spec
    return None


def _patch_documents(directory: Path, patch: Obj) -> Iterator[Obj]:
    if unknown := set(patch) - {"path", "patch"}:
        raise KustomizeError(f"Cannot apply patch {patch}: {', '.join(sorted(unknown))} is not supported, "
                             "only path or patch (strategic merge, aimed by its kind and name)")
    if "path" in patch:
        yield from _documents(directory / patch["path"])
    else:
        yield from (d for d in yaml.safe_load_all(patch["patch"]) if d is not None)


def _apply_patch(objects: list[Obj], patch: Obj) -> None:
    target = _target(objects, patch["kind"], patch["metadata"]["name"])
    merged = _merge(target, {k: v for k, v in patch.items() if k != "metadata"})
    target.clear()
    target.update(merged)


def _target(objects: list[Obj], kind: str | None, name: str, kinds: set[str] | None = None) -> Obj:
    for obj in objects:
        if obj["metadata"]["name"] == name and (obj["kind"] == kind or (kind is None and obj["kind"] in kinds)):
            return obj
    raise KustomizeError(f"Cannot patch {kind or '/'.join(sorted(kinds or ()))} {name}: no such resource")


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge: maps merge key by key (null deletes), listed lists merge item by item."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(merged[key], value, key) if key in merged else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged_list = copy.deepcopy(base)
        added = []
        for item in patch:
            match = next((i for i, old in enumerate(merged_list) if old.get(key) == item.get(key)), None)
            if match is None:
                added.append(copy.deepcopy(item))
            else:
                merged_list[match] = _merge(merged_list[match], item)
        return added + merged_list  # kustomize puts new items first
    return copy.deepcopy(patch)


def _set_image(objects: list[Obj], image: Obj) -> None:
    if unknown := set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"Cannot set image {image['name']}: unknown {', '.join(sorted(unknown))}")
    for obj in objects:
        pod = _pod_spec(obj)
        for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def comparable(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    """Objects by kind and name, with generated name suffixes replaced by -HASH: two renderings of
    the same kustomization compare equal whatever hash each gave the generated names."""
    generated = {}
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret") and (m := GENERATED_SUFFIX.match(obj["metadata"]["name"])):
            generated[obj["metadata"]["name"]] = m["base"] + "-HASH"
    for obj in objects:
        if obj["kind"] == "Secret":  # kubectl folds long base64 lines
            obj["data"] = {k: "".join(v.split()) for k, v in obj.get("data", {}).items()}
    text = json.dumps(objects, sort_keys=True)
    for full, neutral in generated.items():
        text = text.replace(json.dumps(full), json.dumps(neutral))
    return {(o["kind"], o["metadata"]["name"]): o for o in json.loads(text)}
