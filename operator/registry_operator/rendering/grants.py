"""Render what the access plan decided: the robots Secret of a registry and the pull
(push) Secrets written into granted namespaces (the policy Secrets: `policy`). Pure, like
the rest of rendering.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence

from registry_operator import access, models, robots
from registry_operator.rendering import manifests, names

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
DOCKERCONFIGJSON_KEY = ".dockerconfigjson"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def robots_secret(owner: models.Owner, state: Mapping[str, robots.Robot]) -> manifests.Manifest:
    """The operator's record of every robot credential of the registry."""
    return manifests.manifest(
        "secret.yaml.j2",
        name=names.robots_secret(owner.name),
        namespace=owner.namespace,
        labels=names.labels(owner.name, "robots"),
        owner_references=manifests.owner_references(owner),
        data={key: _b64(robots.dump(robot)) for key, robot in sorted(state.items())},
    )


# What the informational list of paths on a pull Secret may take. All of a Secret's
# annotations share 256 KiB, and thousands of Repositories may grant one namespace:
# listed whole, the list made the Secret unwritable (found by review).
LISTING_LIMIT = 2048


def listing(paths: Sequence[str], limit: int = LISTING_LIMIT) -> str:
    """``paths`` joined by commas, the first that fit in ``limit`` and a count of the rest."""
    text = ",".join(paths)
    if len(text) <= limit:
        return text
    shown: list[str] = []
    size = 0
    for path in paths:
        if size + len(path) + 1 > limit - 32:  # room for the count
            break
        shown.append(path)
        size += len(path) + 1
    return ",".join(shown) + f",... and {len(paths) - len(shown)} more"


def access_secret(
    target: access.Target,
    desired: access.Desired,
    credential: robots.Credential,
    paths: tuple[str, ...],
) -> manifests.Manifest:
    """A kubernetes.io/dockerconfigjson Secret for one granted namespace.

    Not owned by the Registry (owner references cannot cross namespaces): the labels
    name the registry, and the operator deletes what the plan no longer wants.
    """
    owner = target.owner
    component = (
        names.PULL_SECRET_COMPONENT if desired.mode == robots.PULL else names.PUSH_SECRET_COMPONENT
    )
    config = access.dockerconfigjson(target.hosts, credential)
    return manifests.manifest(
        "access-secret.yaml.j2",
        name=desired.name,
        namespace=desired.namespace,
        labels=names.access_labels(owner.name, owner.namespace, component),
        annotations={
            names.ROBOT_ANNOTATION: credential.name,
            names.REPOSITORIES_ANNOTATION: listing(paths),
            names.SERVICE_ACCOUNTS_ANNOTATION: ",".join(desired.service_accounts),
        },
        type=DOCKERCONFIGJSON,
        data={DOCKERCONFIGJSON_KEY: _b64(json.dumps(config, sort_keys=True))},
    )
