"""Drive Open WebUI in a headless browser against a running dreamsight gateway.

    python scripts/open_webui_check.py [--url http://127.0.0.1:8080] [--image PNG]

A check by hand, not a test (Open WebUI is about 7 GB; see README, "Open
WebUI"): run it with the Python that has ``open-webui`` and ``playwright``
installed, against Open WebUI started with ``WEBUI_AUTH=False`` and pointed
at the gateway. It prints the models the page is offered (and which are
hidden), the entries of the chat model picker, and the reply to a chat typed
into the page (with an attached image when given). Chromium is Debian's
(``apt-get install chromium``); playwright's own download needs the internet.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

CHROMIUM = "/usr/bin/chromium"


async def _dismiss_release_notes(page: Any) -> None:
    ok = page.get_by_text("Okay, Let's Go!")
    if await ok.count():
        await ok.click()
        await page.wait_for_timeout(1000)


async def check(url: str, model: str, image: str | None) -> None:
    from playwright.async_api import async_playwright  # type: ignore[import-not-found,unused-ignore]

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        await page.goto(url, wait_until="load", timeout=120_000)
        await page.wait_for_timeout(10_000)
        await _dismiss_release_notes(page)
        models = await page.evaluate(
            """async () => (await (await fetch('/api/models', {headers:
                {Authorization: 'Bearer ' + localStorage.token}})).json()).data"""
        )
        print(
            "offered:",
            [
                (m["id"], bool(((m.get("info") or {}).get("meta") or {}).get("hidden")))
                for m in models
            ],
        )
        await page.get_by_role("button", name=model).first.click()
        await page.wait_for_timeout(1500)
        print(
            "picker:",
            await page.locator("[role='option'], [data-arrow-selected]").all_inner_texts(),
        )
        await page.keyboard.press("Escape")
        await page.goto(f"{url}/?model={model}", wait_until="load")
        await page.wait_for_timeout(8000)
        await _dismiss_release_notes(page)
        if image:
            await page.locator("input[type=file]").first.set_input_files(image)
            await page.wait_for_timeout(4000)
        await page.locator("#chat-input").click()
        await page.keyboard.type("Describe the image.")
        await page.keyboard.press("Enter")
        await page.wait_for_timeout(15_000)
        print("chat:", (await page.locator("#messages-container").inner_text())[-600:])
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="llava-demo")
    parser.add_argument("--image", help="a PNG to attach to the chat")
    args = parser.parse_args()
    asyncio.run(check(args.url, args.model, args.image))


if __name__ == "__main__":
    main()
