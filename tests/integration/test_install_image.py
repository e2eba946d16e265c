"""The image, as far as it can be checked without a Docker engine.

`make image` builds the Dockerfile where Docker exists. Here: the build context that
.dockerignore lets through is enough to build the wheel the image installs, the wheel
holds both programs with the operator's templates and nothing of the dev tooling, and
the Dockerfile agrees with the operator and the chart on user, paths and commands.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from berth_dev import generate
from registry_operator.rendering import names

ROOT = generate.REPO_ROOT
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def final_stage() -> str:
    return DOCKERFILE[DOCKERFILE.rindex("\nFROM ") :]


def context_entries() -> list[str]:
    """The paths .dockerignore lets into the build context (an allowlist after `*`)."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the .dockerignore is an allowlist"
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def test_runs_as_the_user_the_pods_declare() -> None:
    stage = final_stage()
    assert re.search(rf"^USER {names.RUN_AS}:{names.RUN_AS}$", stage, re.MULTILINE)
    chart = yaml.safe_load_all((generate.MANIFESTS_DIR / "install.yaml").read_text())
    deployment = next(d for d in chart if d and d["kind"] == "Deployment")
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsUser"] == names.RUN_AS
    # The registry pods keep their data where the image's standalone default does.
    assert f"BERTH_STORAGE_ROOT={names.DATA_DIR}" in stage


def test_copies_only_what_the_context_holds() -> None:
    entries = set(context_entries())
    for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.MULTILINE):
        for source in match.group(1).split():
            assert source in entries, f"COPY {source}: not in the .dockerignore allowlist"
            assert (ROOT / source).exists(), f"COPY {source}: no such path"


def test_multi_stage_and_commands() -> None:
    assert DOCKERFILE.count("\nFROM ") == 2
    assert "COPY --from=build /opt/berth /opt/berth" in final_stage()
    assert 'CMD ["python", "-m", "registry_server"]' in final_stage()


@pytest.mark.integration
def test_wheel_from_the_build_context(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for entry in context_entries():
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(
                source, context / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(source, context / entry)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("berth-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in files if not name.startswith("berth-")}
    assert tops == {"registry_server", "registry_operator"}
    templates = ROOT / "operator" / "registry_operator" / "rendering" / "templates"
    for template in templates.glob("*.j2"):
        assert f"registry_operator/rendering/templates/{template.name}" in files

    # What the pods run imports from the wheel alone and finds its templates.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import registry_server.app, registry_operator.__main__;"
        "from registry_operator.rendering import manifests;"
        "assert manifests.__file__.startswith(sys.argv[1]), manifests.__file__;"
        "[manifests._environment().get_template(t) for t in sys.argv[2:]]"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(unpacked), *(t.name for t in templates.glob("*.j2"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
