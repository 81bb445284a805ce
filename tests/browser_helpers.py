"""Helpers for the headless-Chromium tests: where Chromium and the screenshots are, a free port, and the page
actions a person takes (pick a tab, choose an option, type and leave a box, wait for a training state).
"""
from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "screenshots"


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def launch_chromium(playwright):
    """Debian's Chromium, headless, with the flags these tests run it with."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def open_page(browser, url: str, timeout: float = 60_000):
    """A new 1280x900 page on ``url``, once its load event (which picks the run) has answered; every wait on it
    allows ``timeout`` ms (the waits are for events, and a loaded 2-core machine is slow)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(timeout)
    page.goto(url)
    wait_loaded(page)
    return page


@pytest.fixture(autouse=True)
def screenshot_on_failure(request):
    """A full-page screenshot of the test's ``page`` when the test failed (import it into the test module)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "page" in request.fixturenames:
        request.getfixturevalue("page").screenshot(path=str(SHOTS / f"FAILED-{request.node.name}.png"),
                                                   full_page=True)


def serve(service):
    """The UI of ``service`` on a free loopback port in this process: (its URL, the Blocks to ``close()``)."""
    from app.ui import build_app, launch_options

    demo = build_app(service)
    demo.queue(default_concurrency_limit=4)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_options(service))
    return f"http://127.0.0.1:{port}/", demo


def train_in_thread(config, listeners, control):
    """A Service ``train_fn`` that trains in the UI's own process (no child process)."""
    from trainer.loop.train import train
    return train(config, listeners=listeners, control=control)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_loaded(page) -> None:
    """The page is up and its load event (which picks the run) has answered."""
    page.wait_for_selector("#run-name input")
    page.wait_for_function("document.querySelector('#run-notice')?.innerText.includes('Run folder')")


def shot(page, name: str) -> None:
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(500)


def choose(page, elem_id: str, text: str) -> None:
    """Pick the option containing ``text`` in a Gradio dropdown."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id} li[role=option]", has_text=text).first.click()
    page.wait_for_timeout(300)


def fill(page, elem_id: str, value) -> None:
    """Type into a Gradio textbox, number or slider (its number box) and leave it, as a person would."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range]):not([type=checkbox])").first
    box.fill(str(value))
    box.press("Tab")


def progress_state(page, run: str | None = None) -> tuple[str, int]:
    """The progress card's state and step; "idle" while there is none, or while it shows another run than
    ``run`` (the card shows the current job while the picked run waits)."""
    card = page.locator("#train-progress .progress-card")
    if not card.count() or (run is not None and card.get_attribute("data-run") != run):
        return "idle", 0
    return card.get_attribute("data-state"), int(card.get_attribute("data-step"))


def wait_state(page, states: tuple[str, ...], timeout: float = 150, min_step: int = 0,
               run: str | None = None) -> tuple[str, int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, step = progress_state(page, run)
        if state in states and step >= min_step:
            return state, step
        if state == "failed":
            pytest.fail("training failed: " + page.inner_text("#train-progress"))
        page.wait_for_timeout(250)
    pytest.fail(f"training did not reach {states} (step >= {min_step}) in {timeout}s; now {progress_state(page)}; "
                + page.input_value("#train-log textarea"))


def image_pixels(page, selector: str):
    from PIL import Image
    src = page.locator(selector).first.get_attribute("src")
    body = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + src).body()
    return Image.open(io.BytesIO(body)).convert("RGB")


def set_run(page, name: str) -> None:
    box = page.locator("#run-name input")
    box.fill(name)
    box.press("Enter")
    page.wait_for_function("n => document.querySelector('#run-notice')?.innerText.includes(n)", arg=name)


# --- the flow --------------------------------------------------------------------------------
