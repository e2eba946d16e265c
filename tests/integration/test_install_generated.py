"""Generated files match their sources (pure: no tools, no processes).

helm/berth/crds/ copies crds/, docs/crd-reference.md is written from the CRD schemas;
`python -m berth_dev.generate` regenerates both. (manifests/ needs helm: its drift
test is in test_install_chart.py.)
"""

from __future__ import annotations

import yaml

from berth_dev import generate


def test_chart_crds_are_the_canonical_crds() -> None:
    problems = generate.drift(generate.chart_crds(), generate.OWNED_DIRS["crds"])
    assert not problems, "\n".join(problems) + "\nrun: python -m berth_dev.generate crds"


def test_crd_reference_is_current() -> None:
    problems = generate.drift(generate.crd_reference())
    assert not problems, "\n".join(problems) + "\nrun: python -m berth_dev.generate docs"


def test_crd_reference_covers_every_field() -> None:
    """Spot checks that the generator walks nested objects and arrays."""
    text = generate.crd_reference()[generate.CRD_REFERENCE].decode()
    for field in (
        "spec.storage.pvc.size",
        "spec.replication.peers[].credentialsSecretRef.name",
        "spec.pullAccess.namespaceSelector.matchExpressions[].operator",
        "status.conditions[].lastTransitionTime",
    ):
        assert f"| `{field}` |" in text, field


def test_samples_are_a_registry_and_a_repository_of_it() -> None:
    documents = []
    for path in sorted((generate.REPO_ROOT / "samples").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = [d["kind"] for d in documents]
    assert kinds.count("Registry") == 1 and kinds.count("Repository") == 1
    registry = next(d for d in documents if d["kind"] == "Registry")
    repository = next(d for d in documents if d["kind"] == "Repository")
    namespaces = {d["metadata"]["name"] for d in documents if d["kind"] == "Namespace"}
    assert registry["metadata"]["namespace"] in namespaces
    assert repository["metadata"]["namespace"] == registry["metadata"]["namespace"]
    assert repository["spec"]["registryRef"]["name"] == registry["metadata"]["name"]
    assert set(repository["spec"]["pullAccess"]["namespaces"]) <= namespaces
