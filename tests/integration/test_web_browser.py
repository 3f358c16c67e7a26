"""The `pmx web` dashboard in a real browser: headless Chromium driven by Playwright's
Python package, against a real pmxd and a real `pmx web`.

Playwright's own browser downloads are not used: the test drives the system's Chromium
(Debian's `chromium`, which CI installs) through `executable_path`, and skips with the
reason when either the package or the browser is missing. Every wait is Playwright's
`expect`, which polls with a deadline.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import free_port, pid_cluster_toml
from tests.integration.test_web import WebServer, start_apps, web  # noqa: F401  (fixture)

CHROMIUM = os.environ.get("PMX_TEST_CHROMIUM") or shutil.which("chromium") or \
    shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium executable to drive (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed (pip install playwright)")

expect = sync_api.expect
WAIT_MS = 15_000


@pytest.fixture
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dashboard_shows_apps_restarts_one_and_streams_its_log(
        web: WebServer, browser: sync_api.Browser) -> None:  # noqa: F811
    start_apps(web.pmx)
    (old_pid,) = web.pmx.pids("idler")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{web.url}/#token={web.token}")
    expect(page).to_have_url(f"{web.url}/", timeout=WAIT_MS)  # the token left the address

    idler = page.locator('article[data-app="idler"]')
    expect(page.locator('article[data-app="web"] tbody tr')).to_have_count(2, timeout=WAIT_MS)
    expect(idler.locator('td[data-field="pid"]')).to_have_text(str(old_pid), timeout=WAIT_MS)
    expect(page.locator("#daemon")).to_contain_text(f"pid {web.pmx.daemon_pid()}")

    idler.locator('button[data-action="restart"]').click()
    expect(page.locator(".toast.ok")).to_contain_text("restarted: idler", timeout=WAIT_MS)
    (new_pid,) = web.pmx.pids("idler")
    assert new_pid != old_pid
    expect(idler.locator('td[data-field="pid"]')).to_have_text(str(new_pid), timeout=WAIT_MS)
    # Printed by the new process, so after the page was opened: it came live.
    expect(page.locator('pre[data-log="idler"]')).to_contain_text(f"idle pid {new_pid}",
                                                                  timeout=WAIT_MS)
    expect(page.locator("#events")).to_contain_text(f"idler:0 online (pid {new_pid})")

    # Opened again without the token in the address: this browser kept it.
    page.goto(f"{web.url}/")
    expect(idler.locator('td[data-field="pid"]')).to_have_text(str(new_pid), timeout=WAIT_MS)
    assert errors == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dashboard_fits_a_phone_and_shows_the_daemon_going_away(
        web: WebServer, browser: sync_api.Browser) -> None:  # noqa: F811
    start_apps(web.pmx)
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True,
                            has_touch=True)
    page.goto(f"{web.url}/#token={web.token}")
    expect(page.locator('article[data-app="web"] tbody tr')).to_have_count(2, timeout=WAIT_MS)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a 390px phone"
    restart = page.locator('article[data-app="web"] button[data-action="restart"]')
    box = restart.bounding_box()
    assert box is not None and box["height"] >= 30, "buttons too small to tap"

    web.pmx.run("kill")
    expect(page.locator("#banner")).to_contain_text("Daemon unreachable", timeout=WAIT_MS)
    web.pmx.start_daemon()
    expect(page.locator("#banner")).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#daemon")).to_contain_text(f"pid {web.pmx.daemon_pid()}",
                                                    timeout=WAIT_MS)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_reload_from_the_page_shows_its_steps_then_the_result(
        web: WebServer, browser: sync_api.Browser) -> None:  # noqa: F811
    # Each replacement takes a second to listen, so the reload lasts long enough to watch.
    toml = pid_cluster_toml("slow", free_port(), instances=2,
                            extra='env = { READY_DELAY = "1" }')
    web.pmx.run("start", str(web.pmx.write("slow.toml", toml)))
    old = set(web.pmx.wait_status("slow", "online", count=2) and web.pmx.pids("slow"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{web.url}/#token={web.token}")
    card = page.locator('article[data-app="slow"]')
    expect(card.locator("tbody tr")).to_have_count(2, timeout=WAIT_MS)
    card.locator('button[data-action="reload"]').click()
    progress = card.locator(".progress")
    expect(progress).to_be_visible(timeout=WAIT_MS)
    expect(card.locator('button[data-action="restart"]')).to_be_disabled()
    expect(progress).to_contain_text("slow:0 replaced: pid", timeout=WAIT_MS)
    expect(page.locator(".toast.ok")).to_contain_text("reloaded: slow", timeout=WAIT_MS)
    expect(progress).to_be_hidden()
    new = set(web.pmx.pids("slow"))
    assert not old & new
    for pid in new:
        expect(card.locator('td[data-field="pid"]', has_text=str(pid))).to_have_count(1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_app_output_is_shown_as_text_never_run(
        web: WebServer, browser: sync_api.Browser) -> None:  # noqa: F811
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    script = web.pmx.write("hostile.py", "import time\n"
                                         f"print({hostile!r}, flush=True)\n"
                                         "time.sleep(3600)\n")
    web.pmx.run("start", str(script), "--name", "hostile")
    web.pmx.wait_status("hostile", "online")
    page = browser.new_page()
    page.goto(f"{web.url}/#token={web.token}")
    log = page.locator("pre.log")
    expect(log).to_contain_text(hostile, timeout=WAIT_MS)
    assert page.evaluate("window.pwned") is None
    assert page.locator("pre.log img, pre.log script").count() == 0
