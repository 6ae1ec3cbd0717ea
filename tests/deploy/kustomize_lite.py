"""Render this repository's kustomize overlays without the kustomize binary (tests only).

Neither kustomize nor helm is installable here (not on PyPI; Debian ships only kubectl 1.20,
whose embedded kustomize v2.0.3 predates directory `resources` and `patches`), so the tests
assemble the overlays with this loader. It is deliberately small and strict: it implements only
the kustomization fields `deploy/kubernetes` uses and refuses every other field, so a manifest
cannot start depending on a feature the loader would silently ignore. Where a real
`kubectl kustomize` (kustomize >= 4) is on PATH, `test_kubernetes.py` renders the same overlays
with it and requires the same objects (`test_loader_matches_kubectl_kustomize`).

Supported:
- `resources`: YAML files (one or more documents) and directories holding a kustomization;
- `namespace`: set on every object;
- `patches`: `{path: file}` strategic-merge patches, matched by kind and name, including
  `$patch: delete`; lists merge by the Kubernetes merge key of their field (containers, env,
  volumes, volumeMounts, ports, ...) and are replaced otherwise, `null` removes a key;
- `images`: `name` with `newName`, `newTag` and/or `digest`, in every `containers` and
  `initContainers` list;
- `secretGenerator` with `envs` files (type Opaque), with
  `generatorOptions: {disableNameSuffixHash: true}` (the only form used: the Secret's name is
  fixed, so no name-reference rewriting is needed).
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "namespace", "patches", "images",
                "secretGenerator", "generatorOptions"}
# strategic-merge keys of the list fields the manifests patch (k8s.io/api patchMergeKey tags)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,  # no merge key in the API: replaced
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
PORT_KEYS = {"containerPort", "port"}  # container ports merge on containerPort, Service on port


class KustomizeError(ValueError):
    """The kustomization uses something this loader does not implement, or is inconsistent."""


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"no kustomization file in {directory}")


def load_documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize directory` would print (order aside)."""
    directory = Path(directory)
    kfile = kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields not implemented by the loader: {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: only kind Kustomization (no Components)")

    objects: list[Obj] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(build(path) if path.is_dir() else load_documents(path))
    objects.extend(_secrets(directory, k))
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: [{{path: ...}}]` is implemented")
        for doc in load_documents(directory / patch["path"]):
            objects = _apply_patch(objects, doc, kfile)
    for image in k.get("images", []):
        _set_image(objects, image)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] in CLUSTER_SCOPED:  # kustomize leaves these alone; so do we: refuse
                raise KustomizeError(f"{kfile}: cluster-scoped {obj['kind']} not implemented")
            obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    _check_unique(objects, kfile)
    return objects


def key(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def _check_unique(objects: list[Obj], where: Path) -> None:
    seen = [key(o) for o in objects]
    dupes = {k for k in seen if seen.count(k) > 1}
    if dupes:
        raise KustomizeError(f"{where}: objects defined twice: {sorted(dupes)}")


def _secrets(directory: Path, k: Obj) -> list[Obj]:
    gens = k.get("secretGenerator", [])
    if not gens:
        return []
    if k.get("generatorOptions") != {"disableNameSuffixHash": True}:
        raise KustomizeError("secretGenerator needs generatorOptions: "
                             "{disableNameSuffixHash: true}")
    out = []
    for gen in gens:
        if set(gen) != {"name", "envs"}:
            raise KustomizeError(f"secretGenerator: only name + envs is implemented, got {gen}")
        data: dict[str, str] = {}
        for env in gen["envs"]:
            data.update(parse_env_file(directory / env))
        out.append({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": gen["name"]},
            "type": "Opaque",
            "data": {n: base64.b64encode(v.encode()).decode() for n, v in data.items()},
        })
    return out


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines; blank lines and # comments skipped (kustomize's env-file format)."""
    if not path.is_file():
        raise KustomizeError(f"env file {path} is missing")
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise KustomizeError(f"{path}: not KEY=value: {raw!r}")
        out[name] = value
    return out


def _apply_patch(objects: list[Obj], patch: Obj, where: Path) -> list[Obj]:
    kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise KustomizeError(f"{where}: patch for {kind}/{name} matches {len(matches)} objects")
    target = matches[0]
    if patch.get("$patch") == "delete":
        return [o for o in objects if o is not target]
    merged = merge(target, patch)
    return [merged if o is target else o for o in objects]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` into `base` (a copy is returned)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise KustomizeError(f"directive {k} inside a patch is not implemented")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        mkey = _merge_key(field, base + patch)
        if mkey is None:
            return copy.deepcopy(patch)
        out_list = copy.deepcopy(base)
        for item in patch:
            for i, existing in enumerate(out_list):
                if existing.get(mkey) == item.get(mkey):
                    out_list[i] = merge(existing, item)
                    break
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports":
        found = {k for i in items for k in i if k in PORT_KEYS}
        if len(found) != 1:
            raise KustomizeError(f"ports list with keys {found}: ambiguous merge key")
        return found.pop()
    if field not in MERGE_KEYS:
        raise KustomizeError(f"patching the list `{field}` is not implemented (no merge key)")
    return MERGE_KEYS[field]


def _set_image(objects: list[Obj], image: Obj) -> None:
    if not set(image) <= {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"images: unsupported fields in {image}")

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("containers", "initContainers") and isinstance(v, list):
                    for c in v:
                        c["image"] = _rewrite(c["image"], image)
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    for obj in objects:
        visit(obj)


def _rewrite(ref: str, image: Obj) -> str:
    name, tag, digest = split_image(ref)
    if name != image["name"]:
        return ref
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", tag)
    out = name + (f":{tag}" if tag else "")
    return out + (f"@{digest}" if digest and "newTag" not in image else "")


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference (a registry port is not a tag)."""
    rest, _, digest = ref.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest or None
    return rest, None, digest or None
