"""The Berth operator: `Registry` custom resources reconciled into running registries.

Layers (enforced by .importlinter): `handlers` (Kopf glue) -> `reconcile` (the join)
-> `rendering` (pure manifests) and `kube` (API calls); `models`, `credentials` and
`status` are pure helpers shared by them.
"""

GROUP = "berth.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
