"""The labeling app in a real browser: Debian's Chromium, headless, driven by Playwright.

Three label requests go to the real broker; a labeler signs in, labels one
frame with the mouse and two with keyboard shortcuts, and the labels are read
back from ``winnow.labels``. A screenshot is saved under pytest's tmp dir;
with ``WINNOW_UPDATE_SCREENSHOT=1`` it also replaces ``docs/label-app.png``
(the README shows it).
"""

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from service.labeling.app import create_label_app
from tests.kafka_helpers import read_json
from tests.service.labeling.conftest import label_request, produce_requests

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[3] / "docs" / "label-app.png"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """uvicorn in a thread, on loopback, with the app's lifespan."""

    def __init__(self, app: object, port: int) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the label app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


async def test_a_labeler_labels_three_frames_in_chromium(
    kafka_settings, winnow_topics, app_settings, tmp_path
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    requests = [
        label_request("cam-1:0:11", 11, source_id="endoscope-3", prediction="1"),
        label_request("cam-1:0:12", 12, source_id="endoscope-3", prediction="2"),
        label_request("cam-1:0:13", 13, source_id="endoscope-3", prediction="3"),
    ]
    await produce_requests(kafka_settings, requests)
    port = _free_port()
    app = create_label_app(kafka_settings, app_settings())
    base = f"http://127.0.0.1:{port}"
    shot = tmp_path / "label-app.png"
    with _Server(app, port), tempfile.TemporaryDirectory(prefix="winnow-chromium-") as profile:
        async with playwright_api.async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=LAUNCH_ARGS,
                viewport={"width": 1100, "height": 720},
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                page.set_default_timeout(20_000)
                await page.goto(base + "/")
                assert page.url.endswith("/login")
                await page.fill("#name", "alice")
                await page.fill("#token", "team-secret")
                await page.click("#sign-in")
                await page.wait_for_url(base + "/")
                expect = playwright_api.expect
                # The group join takes a moment: the page polls until a frame comes.
                await expect(page.locator("#frame-id")).to_have_text("cam-1:0:11", timeout=20_000)
                await expect(page.locator("#source")).to_have_text("endoscope-3")
                await expect(page.locator("#reason")).to_have_text("uncertainty")
                await page.fill("#contrast", "160")  # medical-image contrast, as CSS filter
                await page.locator("#contrast").dispatch_event("input")
                assert "contrast(160%)" in await page.locator("#frame").get_attribute("style")
                await page.screenshot(path=str(shot))
                await page.click("button.cls[data-label='7']")  # the mouse
                await expect(page.locator("#frame-id")).to_have_text("cam-1:0:12")
                await page.keyboard.press("2")  # digit classes: key 2 is class "2"
                await expect(page.locator("#frame-id")).to_have_text("cam-1:0:13")
                await page.keyboard.press("u")  # can't tell
                await expect(page.locator("#empty")).to_be_visible()
                await expect(page.locator("#my-count")).to_have_text("3")
            finally:
                await context.close()
    labels = await read_json(
        kafka_settings, kafka_settings.topics.labels, lambda r: len(r) >= 3, within=20
    )
    # labels are keyed by frame id over three partitions: no order across them
    assert sorted((r["frame_id"], r.get("label"), r["status"], r["annotator"]) for r in labels) == [
        ("cam-1:0:11", "7", "labeled", "alice"),
        ("cam-1:0:12", "2", "labeled", "alice"),
        ("cam-1:0:13", None, "unlabelable", "alice"),
    ]
    assert shot.stat().st_size > 10_000
    if os.environ.get("WINNOW_UPDATE_SCREENSHOT"):  # refresh the README's picture on request
        shutil.copyfile(shot, DOCS_SCREENSHOT)
