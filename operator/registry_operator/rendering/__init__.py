"""Pure rendering: a parsed `Registry` in, the manifests of its children out.

No I/O and no Kubernetes client here (an import-linter contract keeps it so): the same
inputs always give the same manifests, which is what the golden tests pin down.
"""

from __future__ import annotations

from registry_operator.rendering.manifests import Manifest, render

__all__ = ["Manifest", "render"]
