"""Take images/web_server.png: drive a running web_server.py in headless Chromium, ask about an image, save
the page once the answers have streamed.

  make web &                                   # or any web_server.py command
  .venv/bin/python scripts/screenshot_web.py --url http://127.0.0.1:7788 \
      --image dataset/eval_images/02_green_triangle.jpg
"""
import argparse
import os
import shutil
import sys

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.cli import HelpFormatter  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7788", help="the running web_server.py")
    p.add_argument("--image", default="dataset/eval_images/02_green_triangle.jpg", help="image to upload")
    p.add_argument("--questions", nargs="+", default=["What colour is the shape?", "What shape is it?",
                                                       "这个图形是什么颜色？"], help="questions asked in turn")
    p.add_argument("--temperature", type=float, default=0.0, help="set in the page's Sampling panel")
    p.add_argument("--explain", action="store_true", help="switch 'Where did it look?' on first: the last answer's "
                   "heatmap is in the picture")
    p.add_argument("--out", default="images/web_server.png", help="the screenshot (PNG)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium", help="browser binary")
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 960}, device_scale_factor=1)
        page.goto(args.url)
        page.wait_for_selector("#question textarea", timeout=60_000)
        page.locator("#image input[type=file]").set_input_files(args.image)
        page.wait_for_selector("#image img", timeout=60_000)
        page.get_by_text("Sampling").click()
        temp = page.get_by_label("temperature (0: greedy)").first  # the slider's number box
        temp.fill(str(args.temperature))
        temp.press("Enter")
        if args.explain:
            page.locator("#explain input[type=checkbox]").check()
        for i, q in enumerate(args.questions):
            page.locator("#question textarea").fill(q)
            page.locator("#send").click()
            page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=bot]').length > n", arg=i,
                                   timeout=120_000)
            page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=120_000)
        if args.explain:
            page.wait_for_function("() => document.querySelector('#heatmap img')?.naturalWidth > 0", timeout=60_000)
        page.get_by_text("Sampling").click()  # fold the panel again
        page.wait_for_timeout(500)
        page.screenshot(path=args.out, full_page=True)
        answers = [m.inner_text() for m in page.locator("#chat [data-testid=bot]").all()]
        print(f"{args.out}: {list(zip(args.questions, answers))}")
        browser.close()


if __name__ == "__main__":
    main()
