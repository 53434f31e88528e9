"""The chat page of `zagreus serve` in a real browser: headless Chromium (Debian's package) driven
by Playwright (from PyPI). Started by tests/clients.rs against a running server.

Usage: webui_test.py BASE_URL SCREENSHOT_DIR [API_KEY]
Prints one line per check that passed; exits non-zero at the first that fails.
"""

import json
import os
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

base, shots = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else None
chromium = os.environ.get("ZAGREUS_CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 30_000


def check(name, cond, detail=""):
    if not cond:
        print(f"FAILED: {name} {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {name}")


def wait_js(page, expr, secs=30):
    """Polls a JavaScript expression until it is truthy (the page's CSP forbids the string
    evaluation that Playwright's own waiting for a function uses)."""
    deadline = time.monotonic() + secs
    while not page.evaluate(expr):
        if time.monotonic() > deadline:
            check(f"waiting for {expr}", False, "timed out")
        time.sleep(0.05)


def metric(name):
    req = urllib.request.Request(base + "/metrics")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    text = urllib.request.urlopen(req).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")

    if key:
        # The page asks for the key once and keeps it.
        page.wait_for_selector("#key-form:not([hidden])")
        check("asks for the API key", page.is_visible("#key"))
        page.fill("#key", key)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-form", state="hidden")
        check("key accepted", page.evaluate("JSON.parse(localStorage.getItem('zagreus.apiKey'))") == key)
        # 401 on a request: the console error is the browser's, for the failed /v1/models.
        errors = [e for e in errors if "401" not in e]

    wait_js(page, "document.getElementById('model-name').textContent !== '…'")
    check("model name shown", "SmolLM2" in page.text_content("#model-name"), page.text_content("#model-name"))

    # A message streams an answer into the page; Enter sends.
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .stats")
    answer = page.text_content(".msg.assistant")
    check("answer streamed", "Paris" in answer, answer)
    stats = page.text_content(".msg.assistant .stats")
    check("stats after the answer", "tok/s" in stats and "context" in stats, stats)
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    check("Shift+Enter kept in the input", page.input_value("#input") == "line one\nline two", page.input_value("#input"))
    page.fill("#input", "")

    # Markdown: code blocks keep their whitespace and get a copy button; HTML is escaped.
    html = page.evaluate("markdown('Text **bold** <b>x</b>\\n```py\\n    indented = 1\\n```')")
    check("markdown code block", "<pre>" in html and "    indented = 1" in html and "copy" in html, html)
    check("markdown escapes HTML", "&lt;b&gt;" in html and "<strong>bold</strong>" in html, html)

    # Stop cancels a long answer, and the server ends the request.
    page.fill("#max-tokens", "2000")
    before = metric('zagreus_requests_total{status="499"}')
    page.fill("#input", "Write a very long story about a dragon.")
    page.press("#input", "Enter")
    page.wait_for_selector("#stop:not([hidden])")
    wait_js(page, "document.querySelectorAll('.msg.assistant')[1] && document.querySelectorAll('.msg.assistant')[1].textContent.length > 20")
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    stats = page.locator(".msg.assistant .stats").nth(1).text_content()
    check("stopped answer marked", "stopped" in stats, stats)
    for _ in range(100):
        if metric('zagreus_requests_total{status="499"}') > before and metric("zagreus_sequences_running") == 0:
            break
        time.sleep(0.1)
    check("server ended the stopped request", metric('zagreus_requests_total{status="499"}') > before)
    check("no sequence left running", metric("zagreus_sequences_running") == 0)

    # Regenerate and edit are offered on the last messages.
    check("regenerate offered", page.is_visible("text=Regenerate"))
    check("edit offered", page.is_visible("text=Edit last message"))

    # A reload keeps the conversation.
    count = page.locator(".msg").count()
    page.reload()
    page.wait_for_selector(".msg.assistant")
    check("conversation kept across reloads", page.locator(".msg").count() == count, page.locator(".msg").count())
    check("chat listed", page.locator("#chats li").count() == 1)
    page.screenshot(path=os.path.join(shots, "webui-desktop.png"))

    # An error from the server is shown in the page (a prompt longer than the context).
    page.fill("#input", "parola " * 3000)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    err = page.text_content(".msg.error")
    check("server error shown", "context" in err and "tokens" in err, err)
    errors = [e for e in errors if "400" not in e]

    # New chat: an empty conversation, the old one still listed.
    page.click("#new-chat")
    check("new chat", page.locator(".msg").count() == 0 and page.locator("#chats li").count() == 2)
    page.click("#chats li:nth-child(2) button.open")
    check("past chat opens", page.locator(".msg.user").count() >= 2)

    # Phone width: the page still fits, the chats behind a button.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    ph = phone.new_page()
    ph.set_default_timeout(TIMEOUT)
    if key:
        # The key kept from an earlier visit (set on the origin before the page's first request).
        ph.goto(base + "/webui/style.css")
        ph.evaluate(f"localStorage.setItem('zagreus.apiKey', {json.dumps(json.dumps(key))})")
    ph.goto(base + "/")
    wait_js(ph, "document.getElementById('model-name').textContent !== '…'")
    width = ph.evaluate("document.documentElement.scrollWidth")
    check("fits a phone-width window", width <= 390, width)
    check("chats behind a button on a phone", ph.is_visible("#toggle-sidebar") and not ph.is_visible("#new-chat"))
    ph.click("#toggle-sidebar")
    ph.wait_for_selector("#new-chat", state="visible")
    ph.click("#close-sidebar")
    ph.wait_for_selector("#new-chat", state="hidden")
    ph.fill("#input", "Ciao!")
    ph.press("#input", "Enter")
    ph.wait_for_selector(".msg.assistant .stats")
    ph.screenshot(path=os.path.join(shots, "webui-phone.png"))

    check("no console errors", not errors, errors)
    browser.close()
print("webui: all checks passed")
