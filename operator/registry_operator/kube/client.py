"""A small, typed facade over the official client: get, list, apply, delete (sync)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import kubernetes
import urllib3

from registry_operator.kube import errors, resources

Object = dict[str, Any]
Objects = list[Object]  # (`list` is a method of Client in its own scope)

FIELD_MANAGER = "berth"
APPLY = "application/apply-patch+yaml"  # a JSON body is valid YAML
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Metadata only (no spec, data or status): what a watch that only asks "who changed" needs.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class Client:
    """One connection pool, shared by all reconciles; safe to use from several threads."""

    def __init__(self, api: Any, *, timeout: float = 30.0) -> None:
        self._api = api
        self._timeout = timeout

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Client:
        """In-cluster credentials when present, else the kubeconfig ($KUBECONFIG)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                client_configuration=configuration,
            )
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        self._api.close()

    def _open(
        self,
        method: str,
        path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
        accept: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        """Send a request; the response, its body not read yet. An error answer from
        the client or a failed connection is raised as a KubeError."""
        headers = {"Accept": accept}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self._api.call_api(
                *request, _request_timeout=self._timeout if timeout is None else timeout
            )
        except kubernetes.client.exceptions.ApiException as exc:
            raise errors.from_status(exc.status or 0, exc.body, str(exc.reason)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise errors.Retryable(f"{method} {path}: {exc}") from exc

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        response = self._open(
            method, path, query=query, body=body, content_type=content_type, accept=accept
        )
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise errors.Retryable(f"{method} {path}: {exc}") from exc
        if not 200 <= response.status < 300:
            raise errors.from_status(response.status, data, f"{method} {path}")
        return response.status, json.loads(data) if data else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Object:
        """The object; raises errors.NotFound when it does not exist."""
        path = resources.lookup(api_version, kind).path(namespace, name)
        return dict(self._call("GET", path)[1])

    def find(self, api_version: str, kind: str, namespace: str, name: str) -> Object | None:
        try:
            return self.get(api_version, kind, namespace, name)
        except errors.NotFound:
            return None

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str = ""
    ) -> list[Object]:
        """Objects of a kind; `namespace` None lists a namespaced kind in all namespaces."""
        resource = resources.lookup(api_version, kind)
        path = resource.path(namespace, all_namespaces=namespace is None and resource.namespaced)
        query = [("labelSelector", label_selector)] if label_selector else []
        items = self._call("GET", path, query=query)[1].get("items") or []
        return [dict(item) for item in items]

    def list_metadata(
        self,
        api_version: str,
        kind: str,
        label_selector: str = "",
        namespace: str | None = None,
        page: int = 500,
    ) -> tuple[Objects, str]:
        """The metadata of every object of a kind (in `namespace`, None: in all), in pages
        of `page`, and the resourceVersion to watch from."""
        resource = resources.lookup(api_version, kind)
        path = resource.path(namespace, all_namespaces=namespace is None and resource.namespaced)
        found: Objects = []
        token = ""
        while True:
            query = [("limit", str(page))]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            listed = self._call("GET", path, query=query, accept=METADATA_LIST)[1] or {}
            found.extend(dict(item.get("metadata") or {}) for item in listed.get("items") or [])
            meta = listed.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                return found, str(meta.get("resourceVersion") or "")

    def watch_metadata(
        self,
        api_version: str,
        kind: str,
        resource_version: str,
        label_selector: str = "",
        timeout_seconds: int = 300,
        opened: Any = None,
        namespace: str | None = None,
    ) -> Iterator[tuple[str, Object]]:
        """The events of a kind (in `namespace`, None: in all) after `resource_version`,
        metadata only:
        (type, the object's metadata), BOOKMARK events included; ends when the server
        ends the watch. `opened(response)` is told the open response (to close it from
        another thread). Raises Expired when the version is too old."""
        resource = resources.lookup(api_version, kind)
        path = resource.path(namespace, all_namespaces=namespace is None and resource.namespaced)
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        response = self._open(
            "GET", path, query=query, accept=METADATA, timeout=(30, timeout_seconds + 30)
        )
        raw = response.response  # urllib3's, not read yet: the events are streamed
        try:
            if response.status == 410:
                raise errors.Expired(
                    f"watch {path}: resourceVersion {resource_version} expired", 410
                )
            if not 200 <= response.status < 300:
                raise errors.from_status(response.status, raw.data, f"watch {path}")
            if opened is not None:
                opened(raw)
            pending = b""
            for chunk in raw.stream(64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind_of_event = str(event.get("type") or "")
                    found = event.get("object") or {}
                    if kind_of_event == "ERROR":
                        code = int(found.get("code") or 0)
                        message = str(found.get("message") or f"watch {path}: error {code}")
                        if code == 410:
                            raise errors.Expired(message, 410)
                        raise errors.Retryable(message, code)
                    yield kind_of_event, dict(found.get("metadata") or {})
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise errors.Retryable(f"watch {path}: {exc}") from exc
        finally:
            raw.release_conn()

    def apply(self, manifest: Mapping[str, Any], subresource: str | None = None) -> Object:
        """Server-side apply as field manager "berth", taking over conflicting fields.

        Forcing is deliberate: the operator is the authority over its children, and a
        hand edit of a field it sets is drift to be repaired, not a conflict to report.
        """
        meta = manifest["metadata"]
        path = resources.of(dict(manifest)).path(meta.get("namespace"), meta["name"], subresource)
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return dict(self._call("PATCH", path, query=query, body=manifest, content_type=APPLY)[1])

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        body: Any,
        content_type: str = MERGE_PATCH,
    ) -> Object:
        """A merge patch (or a JSON patch) of fields another party owns, such as the
        imagePullSecrets of a ServiceAccount: server-side apply would replace that atomic
        list as a whole. Put metadata.resourceVersion (or a JSON patch `test`) in the body
        to make it conditional; a stale one raises errors.Conflict."""
        path = resources.lookup(api_version, kind).path(namespace, name)
        query = [("fieldManager", FIELD_MANAGER)]
        return dict(self._call("PATCH", path, query=query, body=body, content_type=content_type)[1])

    def create(self, manifest: Mapping[str, Any]) -> Object:
        """Create; raises errors.Conflict when the object already exists."""
        resource = resources.of(dict(manifest))
        path = resource.path(manifest["metadata"].get("namespace"))
        query = [("fieldManager", FIELD_MANAGER)]
        return dict(self._call("POST", path, query=query, body=manifest)[1])

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete in the background; an object already gone is not an error."""
        path = resources.lookup(api_version, kind).path(namespace, name)
        try:
            self._call("DELETE", path, body={"propagationPolicy": "Background"})
        except errors.NotFound:
            return
