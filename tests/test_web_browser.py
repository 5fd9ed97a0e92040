"""web_server.py in a subprocess, used through headless Chromium (Debian's `chromium`) driven by Playwright.

Upload, ask, a streamed answer, a follow-up in the same conversation, a new image starting a new
conversation (also when asked at once, and for the same file uploaded again), and no request to any other host.
The "Where did it look?" toggle: the answered image with its heatmap, per session, following each answer.
Messages in the page for a question without an image, a damaged `.png`, a `.txt` file and an empty question. Two browser contexts at once, each answered about its
own image. The dirty-data corpus's images uploaded one after another in one page: each bad one explained in
the status line, each unusual valid one answered. Without Chromium these tests are skipped, unless
REQUIRE_BROWSER_TESTS=1 (.ci/run installs Chromium and sets it).
"""
import json
import os
import shutil

import pytest

from tests.conftest import ROOT
from tests.served_model import COLOURS, FOLLOW_UP, QUESTION, Server, colour_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False")
# Flags for a machine without network or display; background networking would try (and fail) to reach Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000

if not os.path.exists(CHROMIUM) and not os.environ.get("REQUIRE_BROWSER_TESTS"):  # .ci/run sets it
    pytest.skip("the browser tests need Chromium: apt-get install chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    for name, rgb in COLOURS.items():
        colour_image(rgb, seed=77).save(d / f"{name}.png")
    (d / "notes.txt").write_text("this is not an image\n")
    (d / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # a PNG signature, then garbage
    return d


@pytest.fixture(scope="module")
def web(served_model, random_tower, tmp_path_factory):
    ckpt, _ = served_model
    log = tmp_path_factory.mktemp("web") / "server.log"
    server = Server(["web_server.py", "--ckpt", ckpt, "--vision_model", random_tower, "--device", "cpu",
                     "--examples_dir", os.path.join(ROOT, "dataset", "eval_images")], ROOT, ENV, log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """The demo page as a user sees it."""

    def __init__(self, browser, url):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.hosts = set()
        self.page.on("request", lambda r: self.hosts.add(r.url.split("/")[2]))
        self.page.goto(url)
        self.page.wait_for_selector("#question textarea", timeout=TIMEOUT_MS)

    def upload(self, path, shown=True):
        self.page.locator("#image input[type=file]").set_input_files(str(path))
        if shown:  # the preview appears once the upload has reached the server
            self.page.wait_for_selector("#image img", timeout=TIMEOUT_MS)

    def ask(self, text):
        n = self.page.locator("#chat [data-testid=bot]").count()
        self.page.locator("#question textarea").fill(text)
        self.page.locator("#send").click()
        return n

    def wait_answer(self, n_before):
        """The text of answer number n_before + 1, once the server has finished streaming it."""
        self.page.wait_for_function(
            "n => document.querySelectorAll('#chat [data-testid=bot]').length > n", arg=n_before,
            timeout=TIMEOUT_MS)
        self.page.wait_for_function(  # Send is disabled while an answer streams
            "() => !document.querySelector('#send').disabled", timeout=TIMEOUT_MS)
        return self.page.locator("#chat [data-testid=bot]").nth(n_before).inner_text().strip()

    def user_messages(self):
        return [m.inner_text().strip() for m in self.page.locator("#chat [data-testid=user]").all()]

    def status(self):
        return self.page.locator("#status").inner_text().strip()

    def wait_status(self, words):
        self.page.wait_for_function(
            "w => (document.querySelector('#status')?.innerText || '').includes(w)", arg=words, timeout=TIMEOUT_MS)
        return self.status()

    def close(self):
        self.context.close()


def test_upload_ask_follow_up(web, browser, images):
    page = Page(browser, web.url)
    try:
        assert "64_vlm_sft" in page.page.locator("#header").inner_text()
        assert "parameters" in page.page.locator("#header").inner_text()
        page.upload(images / "red.png")
        answer = page.wait_answer(page.ask(QUESTION))
        assert answer == "red"
        answer = page.wait_answer(page.ask(FOLLOW_UP))  # same conversation: the image is still there
        assert answer == "red"
        assert page.user_messages() == [QUESTION, FOLLOW_UP]
        # a new image starts a new conversation
        page.upload(images / "blue.png")
        page.page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length == 0",
                                    timeout=TIMEOUT_MS)
        assert page.wait_answer(page.ask(QUESTION)) == "blue"
        assert page.hosts <= {web.url.split("/")[2]}, f"the page fetched from other hosts: {page.hosts}"
    finally:
        page.close()


def test_errors_are_shown_in_the_page(web, browser, images):
    page = Page(browser, web.url)
    try:
        page.ask(QUESTION)
        assert "Upload an image first" in page.wait_status("Upload an image")
        page.upload(images / "fake.png", shown=False)
        assert "fake.png is not an image" in page.wait_status("fake.png")
        # a file that does not even claim to be an image is stopped by the page before upload, with a toast
        page.upload(images / "notes.txt", shown=False)
        page.page.wait_for_function("() => document.body.innerText.includes('Invalid file type: notes.txt')",
                                    timeout=TIMEOUT_MS)
        page.upload(images / "green.png")
        page.page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').trim() == ''",
                                    timeout=TIMEOUT_MS)
        page.ask("   ")
        assert "Type a question" in page.wait_status("Type a question")
        page.ask("why " * 9000)
        assert "this model's context is 128 tokens" in page.wait_status("reads at most")  # the trained length
        assert "context 128" in page.page.locator("#header").inner_text()
        assert page.wait_answer(page.ask(QUESTION)) == "green"
        assert "Traceback" not in page.page.content()
    finally:
        page.close()


def test_question_right_after_upload_keeps_its_answer(web, browser, images):
    """Asked before the upload's own events have finished: the answer is about the new image and stays (the
    page, not a late server event, clears the chat for a new image)."""
    page = Page(browser, web.url)
    try:
        page.upload(images / "red.png")
        assert page.wait_answer(page.ask(QUESTION)) == "red"
        page.upload(images / "blue.png", shown=False)
        page.page.wait_for_selector('#image img[src*="blue.png"]', timeout=TIMEOUT_MS)
        assert page.wait_answer(page.ask(QUESTION)) == "blue"
        page.page.wait_for_timeout(3000)  # any late event would have landed by now
        assert page.user_messages() == [QUESTION]
        assert page.page.locator("#chat [data-testid=bot]").nth(0).inner_text().strip() == "blue"
        # the same file again: a new conversation too
        page.upload(images / "blue.png", shown=False)
        page.page.wait_for_function("() => !document.querySelector('#chat [data-testid=bot]')", timeout=TIMEOUT_MS)
        assert page.wait_answer(page.ask(FOLLOW_UP)) == "blue"
        assert page.user_messages() == [FOLLOW_UP]
    finally:
        page.close()


def test_two_visitors_keep_their_own_image(web, browser, images):
    a, b = Page(browser, web.url), Page(browser, web.url)
    try:
        a.upload(images / "red.png")
        b.upload(images / "blue.png")
        n_a, n_b = a.ask(QUESTION), b.ask(QUESTION)  # both in flight at once
        assert (a.wait_answer(n_a), b.wait_answer(n_b)) == ("red", "blue")
        assert a.user_messages() == [QUESTION] and b.user_messages() == [QUESTION]
    finally:
        a.close()
        b.close()


def red_share(png: bytes) -> float:
    """The share of strongly red pixels in the left half of a picture (draw_heatmap puts the image there)."""
    import io

    import numpy as np
    from PIL import Image
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    left = pixels[:, : pixels.shape[1] // 2]
    return float(((left[..., 0] > 150) & (left[..., 1] < 90) & (left[..., 2] < 90)).mean())


def test_where_did_it_look(web, browser, images):
    """The toggle shows the last answer's image with its heatmap and a note (only in its own session), follows a
    new answer, hides when switched off, comes back for the same answer, and goes with a new image."""
    page, other = Page(browser, web.url), Page(browser, web.url)
    try:
        heatmap_src = ("() => { const i = document.querySelector('#heatmap img');"
                       " return i && i.complete && i.naturalWidth > 0 ? i.src : null; }")
        page.upload(images / "red.png")
        page.page.locator("#explain input[type=checkbox]").check()
        page.page.wait_for_function("() => document.querySelector('#heatmap_note').innerText.includes('next answer')",
                                    timeout=TIMEOUT_MS)
        assert page.wait_answer(page.ask(QUESTION)) == "red"
        src = page.page.wait_for_function(heatmap_src, timeout=TIMEOUT_MS).json_value()
        note = page.page.locator("#heatmap_note").inner_text()
        assert "“red”" in note and "CLS token" in note and "patches" in note
        png = page.context.request.get(src).body()
        assert red_share(png) > 0.2  # the answered image, red, is in the picture
        # the other visitor, who never switched it on, sees no heatmap
        other.upload(images / "blue.png")
        assert other.wait_answer(other.ask(QUESTION)) == "blue"
        assert other.page.locator("#heatmap img").count() == 0 and not other.page.locator("#heatmap").is_visible()
        # off: hidden; on again: the same answer's heatmap, computed again, the same picture
        page.page.locator("#explain input[type=checkbox]").uncheck()
        page.page.wait_for_selector("#heatmap", state="hidden", timeout=TIMEOUT_MS)
        page.page.locator("#explain input[type=checkbox]").check()
        again = page.page.wait_for_function(heatmap_src, timeout=TIMEOUT_MS).json_value()
        assert page.context.request.get(again).body() == png
        # a follow-up: the heatmap follows the new answer; a new image: it goes
        assert page.wait_answer(page.ask(FOLLOW_UP)) == "red"
        page.page.wait_for_function(f"() => ({heatmap_src})() && ({heatmap_src})() !== {json.dumps(again)}",
                                    timeout=TIMEOUT_MS)
        page.upload(images / "blue.png")
        page.page.wait_for_function("() => !document.querySelector('#heatmap img')"
                                    " && !document.querySelector('#heatmap_note').innerText.trim()", timeout=TIMEOUT_MS)
        assert page.wait_answer(page.ask(QUESTION)) == "blue"
        blue = page.page.wait_for_function(heatmap_src, timeout=TIMEOUT_MS).json_value()
        assert red_share(page.context.request.get(blue).body()) < 0.01
        assert "“blue”" in page.page.locator("#heatmap_note").inner_text()
        assert page.hosts <= {web.url.split("/")[2]}, f"the page fetched from other hosts: {page.hosts}"
    finally:
        page.close()
        other.close()


def test_every_corpus_image_is_answered_or_explained(web, browser, tmp_path):
    """The dirty-data corpus's images (tests/bad_corpus.py) uploaded one after another: each bad one gets its
    message in the status line; each unusual but valid one (CMYK, 16-bit, 1-bit, transparency, EXIF) an answer."""
    from tests.bad_corpus import image_files
    words = {"image_empty": "is empty", "not_an_image": "is not an image", "image_truncated": "damaged or truncated",
             "image_damaged": "damaged or truncated", "image_too_large": "million pixels"}
    page = Page(browser, web.url)
    try:
        for name, (data, kind) in image_files().items():
            (tmp_path / name).write_bytes(data)
            if kind in words:
                page.upload(tmp_path / name, shown=False)
                assert words[kind] in page.wait_status(f"{name} ")
            else:  # once this file is shown and its new conversation has begun (chat and status cleared), ask
                page.upload(tmp_path / name, shown=False)
                page.page.wait_for_selector(f'#image img[src*="{name}"]', timeout=TIMEOUT_MS)
                page.page.wait_for_function(
                    "() => !document.querySelector('#chat [data-testid=bot]')"
                    " && (document.querySelector('#status')?.innerText || '').trim() == ''", timeout=TIMEOUT_MS)
                assert page.wait_answer(page.ask(QUESTION)), name
                assert page.status() == "", name
        assert "Traceback" not in page.page.content()
    finally:
        page.close()


def test_the_login_refuses_a_wrong_password(served_model, random_tower, browser, tmp_path):
    """--auth puts Gradio's login page in front of the demo: a wrong password stays on it, the right one opens it."""
    ckpt, _ = served_model
    server = Server(["web_server.py", "--ckpt", ckpt, "--vision_model", random_tower, "--device", "cpu",
                     "--auth", "alice:wonderland-42"], ROOT, ENV, tmp_path / "server.log")
    context = browser.new_context()
    page = context.new_page()
    try:
        def log_in(user, password):
            page.goto(server.url)
            page.wait_for_selector("input[type=password]", timeout=TIMEOUT_MS)
            page.locator("input:not([type=password])").first.fill(user)
            page.locator("input[type=password]").fill(password)
            page.locator("button:has-text('Login')").click()
        log_in("alice", "wrong-password")
        page.wait_for_timeout(1500)
        assert page.locator("#question textarea").count() == 0  # still locked
        assert page.locator("input[type=password]").count() == 1
        log_in("alice", "wonderland-42")
        page.wait_for_selector("#question textarea", timeout=TIMEOUT_MS)  # the demo itself
    finally:
        context.close()
        server.stop()
