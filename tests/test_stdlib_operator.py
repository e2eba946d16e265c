"""The `operator/` folder must never shadow the standard library's `operator` module.

The operator's package lives in `operator/registry_operator`; the folder itself is
not a package. With both the repository root and `operator/` on sys.path (as in
pytest, the editable install and the container image), `import operator` must
still give the standard library module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter; prints what `import operator` resolved to.
_PROBE = """
import importlib, json, sys, sysconfig
sys.modules.pop("operator", None)
for entry in {entries!r}:
    sys.path.insert(0, entry)
import operator
print(json.dumps({{
    "file": getattr(operator, "__file__", None),
    "stdlib": sysconfig.get_paths()["stdlib"],
    "itemgetter": callable(getattr(operator, "itemgetter", None)),
    "spec_origin": importlib.util.find_spec("operator").origin,
}}))
"""


def _probe(entries: list[str], env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(entries=entries)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    value: dict[str, object] = json.loads(result.stdout)
    return value


@pytest.mark.parametrize("via", ["sys.path", "PYTHONPATH"])
def test_import_operator_is_the_standard_library(via: str) -> None:
    assert not (REPO_ROOT / "operator" / "__init__.py").exists()
    paths = [str(REPO_ROOT), str(REPO_ROOT / "operator")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if via == "PYTHONPATH":
        env["PYTHONPATH"] = os.pathsep.join(paths)
        entries: list[str] = []
    else:
        entries = paths[::-1]  # inserted at the front: root first, then operator/
    found = _probe(entries, env)

    assert found["itemgetter"] is True
    stdlib = Path(str(found["stdlib"])).resolve()
    for key in ("file", "spec_origin"):
        location = Path(str(found[key])).resolve()
        assert location.parent == stdlib, f"operator {key} is {location}, not in {stdlib}"
