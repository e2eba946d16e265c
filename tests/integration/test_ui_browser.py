"""The web UI in a real browser (headless chromium driven by selenium) against a real
server with a policy: what each visitor sees, logging in and out, a multi-platform
image and a signature, deleting a tag through the form, and the CSRF refusals.

With BERTH_UI_SCREENSHOTS=<dir> the main pages are saved there as PNG (docs/images/).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.test_auth_clients import (
    SECRETS,
    AuthRegistry,
    Start,
    basic,
    crane_as,
    policy,
    start_auth_registry,
)
from tests.support.browser import chromium
from tests.support.clients import (
    OCI_INDEX,
    OCI_MANIFEST,
    canonical_json,
    descriptor,
    image_manifest,
    sha256,
)
from tests.support.images import make_oci_layout

pytestmark = pytest.mark.integration

RULES: list[dict[str, Any]] = [
    {
        "repository": "team-a/api",
        "immutable_tags": ["release-*"],
        "retention": {"keep_last": 50, "protect": ["stable"]},
        "quota": {"storage": "1Mi"},
    },
]
SIGNATURE = "application/vnd.example.signature"


def populate(registry: AuthRegistry, tmp_path: Path) -> str:
    """Images as real clients push them; returns the digest of team-a/api:v1."""
    crane = crane_as(registry, tmp_path)
    host = registry.host
    make_oci_layout(tmp_path / "api", "v1", layers=3, layer_size=20 * 1024, seed="api")
    crane("push", tmp_path / "api", f"{host}/team-a/api:v1")
    for tag in ("v2", "release-1", "stable"):
        crane("copy", f"{host}/team-a/api:v1", f"{host}/team-a/api:{tag}")
    for repo in ("team-b/secret", "public/tool"):
        make_oci_layout(tmp_path / repo, "v1", seed=repo)
        crane("push", tmp_path / repo, f"{host}/{repo}:v1")
    api = registry.api
    api.default_headers = basic("root")
    platforms = []  # a multi-platform image, as buildx pushes one
    for arch in ("amd64", "arm64"):
        config = canonical_json({"architecture": arch, "os": "linux"})
        layer = f"layer for {arch}".encode() * 100
        for blob in (config, layer):
            api.push_blob("team-a/multi", blob)
        body = image_manifest(config, [layer])
        api.push_manifest("team-a/multi", sha256(body), body)
        platforms.append(
            {**descriptor(OCI_MANIFEST, body), "platform": {"os": "linux", "architecture": arch}}
        )
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": platforms})
    api.push_manifest("team-a/multi", "v1", index, OCI_INDEX)
    subject = api.head("/v2/team-a/api/manifests/v1")
    digest = str(subject.header("Docker-Content-Digest"))
    config = canonical_json({"signed": digest})
    api.push_blob("team-a/api", config)
    signature = canonical_json(
        {
            **json.loads(image_manifest(config, [])),
            "artifactType": SIGNATURE,
            "subject": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": int(subject.header("Content-Length") or 0),
            },
        }
    )
    api.push_manifest("team-a/api", sha256(signature), signature)
    api.default_headers = {}
    return digest


class Visit:
    def __init__(self, driver: WebDriver, registry: AuthRegistry, shots: Path | None) -> None:
        self.driver = driver
        self.base = registry.process.url
        self.shots = shots

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def texts(self, selector: str) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, selector)]

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "main").text)

    def click(self, selector: str, by: str = By.CSS_SELECTOR) -> None:
        """Click, then wait until the page the click loads has loaded.

        The old page is marked in its window object, which a navigation replaces. No
        node of the old page is held: asking chromium about one mid-navigation can fail
        with an inspector error ("Node with given id does not belong to the document")
        rather than the stale-element one selenium's staleness_of expects.
        """
        self.driver.execute_script("window.berthOldPage = true")
        self.driver.find_element(by, selector).click()
        WebDriverWait(self.driver, 15, ignored_exceptions=(WebDriverException,)).until(
            lambda driver: driver.execute_script(
                "return !window.berthOldPage && document.readyState === 'complete'"
            )
        )

    def login(self, name: str, secret: str | None = None) -> None:
        self.open("/ui/login")
        self.driver.find_element(By.ID, "username").send_keys(name)
        self.driver.find_element(By.ID, "password").send_keys(secret or SECRETS[name])
        self.click("submit", By.ID)

    def logout(self) -> None:
        self.click("logout", By.ID)
        assert self.texts("#who") == []

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(self.shots / f"ui-{name}.png"))


def post(url: str, fields: dict[str, str], cookies: dict[str, str], origin: str | None) -> int:
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}
    if origin is not None:
        headers["Origin"] = origin
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(fields).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_ui_in_a_real_browser(registry_process: Start, tmp_path: Path) -> None:
    registry = start_auth_registry(registry_process, tmp_path, policy(RULES))
    digest = populate(registry, tmp_path)
    shots = os.environ.get("BERTH_UI_SCREENSHOTS")
    with chromium() as driver:
        visit = Visit(driver, registry, Path(shots) if shots else None)

        # Anonymous: only what anonymous pull allows, and nothing of the rest.
        visit.open("/ui/")
        assert visit.texts("a.repo") == ["public/tool"]
        visit.open("/ui/repository?name=team-b/secret")
        assert "NAME_UNKNOWN" in visit.text() and "team-b/secret" not in visit.texts("h1")

        # alice may pull team-a/*: she sees it, cannot delete, and not team-b's.
        visit.login("alice")
        assert visit.texts("#who") == ["alice"]
        visit.open("/ui/")
        assert visit.texts("a.repo") == ["public/tool", "team-a/api", "team-a/multi"]
        visit.shot("repositories")
        visit.open("/ui/?q=mul")
        assert visit.texts("a.repo") == ["team-a/multi"]
        visit.open("/ui/repository?name=team-a/api")
        assert [row.get_attribute("data-tag") for row in driver.find_elements(
            By.CSS_SELECTOR, "tr.tag")] == ["release-1", "stable", "v1", "v2"]  # fmt: skip
        assert "immutable" in visit.texts("tr[data-tag='release-1'] td")[0]
        assert "retained" in visit.texts("tr[data-tag='stable'] td")[0]
        pull = driver.find_element(By.CSS_SELECTOR, "tr[data-tag='v1'] input.pull")
        assert pull.get_attribute("value") == f"docker pull {registry.host}/team-a/api:v1"
        assert "of 1.0 MiB" in visit.text()
        assert driver.find_elements(By.CSS_SELECTOR, "button.danger") == []
        visit.shot("tags")
        visit.click("tr[data-tag='v1'] a.mono")
        assert visit.texts("#kind") == ["image"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#layers tbody tr")) == 4  # config + 3
        assert SIGNATURE in visit.texts("#referrers")[0]
        assert digest in visit.texts("h1")[0]
        visit.shot("manifest")
        visit.open("/ui/repository?name=team-a/multi")
        platforms = visit.texts("tr[data-tag='v1'] .badge")
        assert platforms == ["linux/amd64", "linux/arm64"], platforms
        visit.click("tr[data-tag='v1'] a.mono")
        assert visit.texts("#kind") == ["index"]
        assert [r.split()[0] for r in visit.texts("#platforms tbody tr")] == [
            "linux/amd64",
            "linux/arm64",
        ]
        visit.open("/ui/repository?name=team-b/secret")
        assert "NAME_UNKNOWN" in visit.text()
        visit.open("/ui/status")
        assert visit.texts("#version") and visit.texts("#admins-only")
        assert visit.texts("#no-peers") == [] and visit.texts("#gc") == []
        visit.logout()

        # A wrong password is refused on the page, not with a protocol error.
        visit.login("root", "wrong")
        assert "invalid username or password" in visit.texts("#error")[0]

        # root deletes a tag through the form; an immutable one has no working button.
        visit.login("root")
        assert visit.texts("#who") == ["root"]
        visit.open("/ui/repository?name=team-a/api")
        assert driver.find_element(
            By.CSS_SELECTOR, "tr[data-tag='release-1'] button.danger"
        ).get_attribute("disabled")
        visit.click("tr[data-tag='v2'] button.danger")
        assert visit.texts("#notice") == ["Deleted tag v2."]
        assert "v2" not in [
            row.get_attribute("data-tag") for row in driver.find_elements(By.CSS_SELECTOR, "tr.tag")
        ]
        tags = registry.api.get("/v2/team-a/api/tags/list", headers=basic("root")).json()["tags"]
        assert tags == ["release-1", "stable", "v1"]

        visit.open("/ui/status")  # an admin sees storage, GC and replication
        assert visit.texts("#version") and visit.texts("#no-peers") and visit.texts("#gc")
        visit.shot("status")

        # The cookies: HttpOnly, SameSite=Strict, scoped to the UI.
        cookies = {c["name"]: c for c in driver.get_cookies()}
        for name in ("berth_session", "berth_csrf"):
            assert cookies[name]["httpOnly"] and cookies[name]["sameSite"] == "Strict"
            assert cookies[name]["path"] == "/ui/"
        jar = {name: str(cookie["value"]) for name, cookie in cookies.items()}

    # CSRF: the session alone does not delete; a right token from elsewhere neither.
    url = registry.process.url + "/ui/delete"
    fields = {"name": "team-a/api", "tag": "stable"}
    origin = registry.process.url
    assert post(url, fields, jar, origin) == 403
    assert post(url, {**fields, "csrf": "forged"}, jar, origin) == 403
    good = {**fields, "csrf": jar["berth_csrf"]}
    assert post(url, good, jar, "https://evil.example") == 403
    still = registry.api.get("/v2/team-a/api/tags/list", headers=basic("root")).json()["tags"]
    assert "stable" in still
    # The same form with its token is accepted (303 to the repository page).
    assert post(url, good, jar, origin) in (200, 303)
    deadline = time.monotonic() + 5
    while (
        "stable"
        in registry.api.get("/v2/team-a/api/tags/list", headers=basic("root")).json()["tags"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
