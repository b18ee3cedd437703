"""Renders a kustomization the way `kubectl kustomize` does, for the features
deploy/ uses, so CI can validate the manifests with no kustomize binary and
no network: `resources` (files and directories), `namespace`, `images`, and
`patches` (strategic merge, or JSON 6902 with a target). Any other field is
refused rather than ignored, so a manifest never validates for a feature this
renderer silently skipped."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
# Lists merged item by item under these keys (Kubernetes' patchMergeKey); any
# other list is replaced by the patch's, as in a strategic merge.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not support, or is wrong."""


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize DIRECTORY` would print, in order."""
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            resources.extend(render(target))
        else:
            resources.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
    for patch in spec.get("patches", []):
        _apply_patch(resources, patch, directory)
    for image in spec.get("images", []):
        _set_image(resources, image)
    namespace = spec.get("namespace")
    if namespace:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = namespace
    return resources


def _apply_patch(resources: list[dict[str, Any]], patch: dict[str, Any], base: Path) -> None:
    body = yaml.safe_load((base / patch["path"]).read_text()) if "path" in patch else None
    if body is None:
        body = yaml.safe_load(patch["patch"])
    target = patch.get("target")
    if isinstance(body, list):
        if target is None:
            raise KustomizeError("a JSON 6902 patch needs a target")
        for resource in _matching(resources, target["kind"], target["name"]):
            for op in body:
                json6902(resource, op)
        return
    kind, name = body["kind"], body["metadata"]["name"]
    if target is not None:
        kind, name = target.get("kind", kind), target.get("name", name)
    for resource in _matching(resources, kind, name):
        merged = strategic_merge(resource, body)
        resource.clear()
        resource.update(merged)


def _matching(resources: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    if not found:
        raise KustomizeError(f"the patch's target {kind}/{name} is not among the resources")
    return found


def strategic_merge(original: Any, patch: Any, key: str = "") -> Any:
    """`patch` merged into `original`: maps key by key (None removes a key),
    lists of MERGE_KEYS item by item, other values replaced."""
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(original)
        for k, v in patch.items():
            if v is None:
                merged.pop(k, None)
            elif k in merged:
                merged[k] = strategic_merge(merged[k], v, k)
            else:
                merged[k] = copy.deepcopy(v)
        return merged
    if isinstance(original, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        merged_list = copy.deepcopy(original)
        for item in patch:
            same = [i for i, o in enumerate(merged_list) if o.get(field) == item.get(field)]
            if same:
                merged_list[same[0]] = strategic_merge(merged_list[same[0]], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def json6902(document: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) applied in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise KustomizeError(f"unsupported JSON 6902 op {kind!r}")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in node:
            raise KustomizeError(f"replace of a missing path {op['path']}")
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise KustomizeError(f"unsupported JSON 6902 op {kind!r}")


def _set_image(resources: list[dict[str, Any]], image: dict[str, str]) -> None:
    name = image["name"]
    for resource in resources:
        pod = resource.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            current = container.get("image", "")
            base, tag = _split_image(current)
            if base != name:
                continue
            new = image.get("newName", base)
            if "digest" in image:
                container["image"] = f"{new}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{new}:{new_tag}" if new_tag else new


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        return image.split("@", 1)[0], ""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, ""
