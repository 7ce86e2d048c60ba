"""The tracking page and the dispatch board in a real browser: Debian's chromium
(/usr/bin/chromium, installed by `make tools`) driven by playwright (pinned in the
dev extra; never `playwright install`). Services are real and in-process: tracking-
query on PostgreSQL fed by the projection, dispatch on Kafka, the http-gateway.

Screenshots go to test-artifacts/screenshots/ (gitignored; CI keeps them as
artifacts); docs/screenshots/tracking-page.png in the README is one of them.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from shared.auth import Role
from shared.pb import alerts_pb2
from tests.ingest_helpers import bearer
from tests.integration.test_dispatch import alert_envelope, publish
from tests.integration.test_http_gateway import (
    Web,
    travelling,
    web,  # noqa: F401  (the fixture)
)
from tests.integration.test_tracking_query import (
    TENANT,
    project,
    query,  # noqa: F401  (the fixture)
)
from tests.projection_helpers import T0, gps_envelope, producer_for

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
PHONE: ViewportSize = {"width": 412, "height": 915}
DESKTOP: ViewportSize = {"width": 1000, "height": 800}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `make tools` (Debian's chromium package)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


async def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def test_the_tracking_page_shows_status_eta_timeline_and_moves_the_vehicle(
    web: Web,  # noqa: F811
    browser: Browser,
) -> None:
    token = await travelling(web.query)
    page = await browser.new_page(viewport=PHONE)
    await page.goto(f"{web.base}/t/{token}")

    await expect(page.locator("#status")).to_have_text("In transit")
    await expect(page.locator("#connection")).to_have_text("Live")
    await expect(page.locator("#eta")).not_to_have_text("–")
    await expect(page.locator("#eta-window")).not_to_have_text("–")
    await expect(page.locator("#promised")).not_to_have_text("–")
    await expect(page.locator("#timeline li")).to_have_count(4)
    await expect(page.locator("#timeline li").first).to_contain_text("Created")
    await expect(page.locator("#map")).to_have_attribute("data-vehicle", "53.40400,-2.97800")
    before = await page.locator("#map").get_attribute("data-vehicle")
    await screenshot(page, "tracking-page")

    # A new GPS batch further along: the marker follows, pushed over SSE.
    points = [
        (T0 + timedelta(minutes=20, seconds=30 * i), 53.41 + 0.001 * i, -2.96 + 0.003 * i)
        for i in range(3)
    ]
    await project(web.query.settings, [gps_envelope(TENANT, "veh-secret-7", "phone-1", 2, points)])
    await expect(page.locator("#map")).to_have_attribute("data-vehicle", "53.41200,-2.95400")
    assert before != await page.locator("#map").get_attribute("data-vehicle")
    await screenshot(page, "tracking-page-moved")

    html = await page.content()
    for secret in ("veh-secret-7", "cust-secret-3", "drv-secret-9"):
        assert secret not in html, secret


async def test_an_unknown_tracking_link_says_so_in_words(web: Web, browser: Browser) -> None:  # noqa: F811
    page = await browser.new_page(viewport=PHONE)
    # A well-formed token of no shipment (404), and one copied with the full stop of the
    # sentence around it (malformed: 400). To the reader both lead to no shipment.
    for token, name in (("A" * 22, "tracking-page-unknown"), ("B" * 22 + ".", "tracking-page-bad")):
        await page.goto(f"{web.base}/t/{token}")
        await expect(page.locator("#connection")).to_have_text("No shipment found for this link.")
        await expect(page.locator("#hint")).to_be_visible()
        # No empty status, map or timeline that would pass for a shipment without news.
        await expect(page.locator("main")).to_be_hidden()
        await screenshot(page, name)
        text = await page.locator("body").inner_text()
        for raw in ("HTTP", "404", "400"):
            assert raw not in text, text


async def test_the_dispatch_board_shows_a_new_alert_within_seconds(
    web: Web,  # noqa: F811
    browser: Browser,
) -> None:
    page = await browser.new_page(viewport=DESKTOP)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    await page.goto(f"{web.base}/dispatch")
    token = dict(bearer(Role.DISPATCHER, tenant=TENANT))["authorization"].removeprefix("Bearer ")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await expect(page.locator("#connection")).to_have_text("Live")

    settings = web.dispatch_settings
    async with producer_for(settings) as producer:
        [late] = await publish(producer, settings, [alert_envelope("shp-late", tenant=TENANT)])
        alert = page.locator(f"li[data-alert-id='{late}']")
        await expect(alert).to_be_visible(timeout=10_000)
        await expect(alert).to_contain_text("Late")
        await expect(alert.locator("a")).to_have_attribute("href", "#shipment=shp-late")
        # The link opens the shipment, read with the dispatcher's token (unknown here).
        await alert.locator("a").click()
        await expect(page.locator("#shipment-details")).to_contain_text("shp-late")
        problem = page.locator("#shipment-problem")
        await expect(problem).to_have_text(
            "No shipment with this id, or not one your account may see."
        )
        await screenshot(page, "dispatch-board-unknown-shipment")
        assert "404" not in await page.locator("#shipment").inner_text()

        # Filters: an at-risk warning arrives; "critical only" hides it, "all" shows both.
        [risk] = await publish(
            producer,
            settings,
            [alert_envelope("shp-risk", alerts_pb2.ALERT_KIND_AT_RISK, tenant=TENANT)],
        )
        await expect(page.locator("#alerts li").first).to_have_attribute("data-alert-id", risk)
        await page.select_option("#severity", "3")
        await expect(page.locator("#alerts li")).to_have_count(1)
        await page.select_option("#severity", "0")
        await page.select_option("#kind", "ALERT_KIND_AT_RISK")
        await expect(page.locator("#alerts li")).to_have_count(1)
        await page.select_option("#kind", "")
        await expect(page.locator("#alerts li")).to_have_count(2)

        # The connection drops (the gateway ends every stream); an alert arrives
        # meanwhile. The board resumes from its last position: all three, once each.
        gateway = web.server.gateway
        assert gateway is not None
        gateway.closing.set()
        await expect(page.locator("#connection")).not_to_have_text("Live")
        gateway.closing = asyncio.Event()
        [third] = await publish(producer, settings, [alert_envelope("shp-3", tenant=TENANT)])
        await expect(page.locator("#connection")).to_have_text("Live")
        await expect(page.locator("#alerts li").first).to_have_attribute("data-alert-id", third)
        ids = await page.locator("#alerts li").evaluate_all(
            "items => items.map(item => item.dataset.alertId)"
        )
        assert ids == [third, risk, late]
    await screenshot(page, "dispatch-board")
    assert token not in " ".join(requests), "the token never goes in a URL"
    assert await page.evaluate("sessionStorage.getItem('cargotrack.dispatcher-token')") == token
