"""An in-memory stand-in for the API server: just enough for reconcile and granting.

Objects by (kind, namespace, name) with resourceVersions; server-side apply as a merge of
the applied fields; create refusing an existing name; merge and JSON patches; lists by
namespace (or all) and by an equality label selector. The integration tests run the same
code against a real kube-apiserver; this one makes the decisions fast to pin down.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from registry_operator.kube import errors, resources

Key = tuple[str, str, str]


def _selector(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {k: v for k, v in pairs}


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.reject: dict[str, str] = {}
        self.applied: list[str] = []
        self.calls: list[tuple[str, str, str, str]] = []  # (verb, kind, namespace, name)
        self._versions = itertools.count(1)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("namespace", "")
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return obj

    def namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.put(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            }
        )

    @staticmethod
    def _path(api_version: str, kind: str, namespace: str, name: str) -> None:
        """The URL the real client would build: a name it refuses is refused here too."""
        resource = resources.lookup(api_version, kind)
        resource.path(namespace if resource.namespaced else None, name)

    def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._path(api_version, kind, namespace, name)
        found = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(found) if found is not None else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found = self.find(api_version, kind, namespace, name)
        if found is None:
            raise errors.NotFound(f"{kind} {name} not found", 404)
        return found

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        wanted = _selector(label_selector)
        found = []
        for (k, ns, _), obj in sorted(self.objects.items()):
            if k != kind or (namespace is not None and ns != namespace):
                continue
            labels = obj["metadata"].get("labels") or {}
            if all(labels.get(key) == value for key, value in wanted.items()):
                found.append(copy.deepcopy(obj))
        return found

    def apply(self, manifest: Mapping[str, Any], subresource: str | None = None) -> dict[str, Any]:
        kind, meta = manifest["kind"], manifest["metadata"]
        key = (kind, meta.get("namespace", ""), meta["name"])
        self.calls.append(("apply", *key))
        current = self.objects.get(key)
        if subresource == "status":
            if current is None:
                raise errors.NotFound("gone", 404)
            if current.get("status") != manifest["status"]:
                current["status"] = copy.deepcopy(manifest["status"])
                current["metadata"]["resourceVersion"] = str(next(self._versions))
            return copy.deepcopy(current)
        # By kind, or one object by "Kind/name".
        for refused in (kind, f"{kind}/{meta['name']}"):
            if refused in self.reject:
                raise errors.Rejected(self.reject[refused], 422)
        self.applied.append(f"{kind}/{meta['name']}")
        desired = copy.deepcopy(dict(manifest))
        if current is None:
            self.put(desired)
            return copy.deepcopy(desired)
        desired["metadata"]["uid"] = current["metadata"]["uid"]
        desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if "status" in current:
            desired["status"] = current["status"]
        generation = current["metadata"].get("generation")
        if generation is not None:
            # Like the API server: a spec change moves the generation.
            changed = desired.get("spec") != current.get("spec")
            desired["metadata"]["generation"] = generation + 1 if changed else generation
        if desired != current:
            self.put(desired)
        return copy.deepcopy(self.objects[key])

    def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        key = (manifest["kind"], meta.get("namespace", ""), meta["name"])
        self.calls.append(("create", *key))
        if key in self.objects:
            raise errors.Conflict("already exists", 409, "AlreadyExists")
        return copy.deepcopy(self.put(copy.deepcopy(dict(manifest))))

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        body: Any,
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        self._path(api_version, kind, namespace or "", name)
        key = (kind, namespace or "", name)
        self.calls.append(("patch", *key))
        current = self.objects.get(key)
        if current is None:
            raise errors.NotFound("gone", 404)
        if isinstance(body, list):  # a JSON patch: test and remove on annotations only
            annotations = current["metadata"].setdefault("annotations", {})
            for op in body:
                field = op["path"].rsplit("/", 1)[1].replace("~1", "/").replace("~0", "~")
                if op["op"] == "test" and annotations.get(field) != op["value"]:
                    raise errors.Rejected("test failed", 422)
                if op["op"] == "remove":
                    annotations.pop(field, None)
        else:
            version = (body.get("metadata") or {}).get("resourceVersion")
            if version is not None and version != current["metadata"]["resourceVersion"]:
                raise errors.Conflict("the object has been modified", 409)
            _merge(current, body)
        current["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(current)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._path(api_version, kind, namespace, name)
        self.calls.append(("delete", kind, namespace, name))
        self.objects.pop((kind, namespace, name), None)


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386 merge patch (resourceVersion excepted: the server sets it)."""
    for key, value in patch.items():
        if key == "resourceVersion":
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            child = target.setdefault(key, {})
            _merge(child, value)
        else:
            target[key] = copy.deepcopy(value)
