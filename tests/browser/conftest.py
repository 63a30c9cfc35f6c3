"""Browser fixtures: a live app on the tiny random editor and Debian's Chromium driven by Playwright.

Skipped (with the reason) where Chromium or Playwright is missing; `.ci/run` installs both.
Screenshots go to $HIVE_SCREENSHOTS when set (docs/screenshots for the README), else to tmp.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.app_server import live_app

CHROMIUM = os.environ.get("HIVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


#: Playwright's expect() waits 5 s by default; a shared 2-core CI machine needs longer for an edit.
EXPECT_TIMEOUT_MS = int(os.environ.get("HIVE_BROWSER_TIMEOUT_MS", "60000"))


@pytest.fixture(scope="session")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    playwright_api.expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_pipeline):
    with live_app(tmp_path_factory.mktemp("browser_home"), tiny_pipeline) as live:
        yield live


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    pg = context.new_page()
    pg.goto(app.url)
    pg.get_by_role("tab", name="Edit").wait_for()
    yield pg
    context.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("HIVE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
