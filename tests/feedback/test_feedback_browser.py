"""The judging page in a real headless Chromium (Debian's package, driven by Playwright).

Needs /usr/bin/chromium (`.ci/install-browser.sh`). Without it these tests skip, unless
PALM_RLHF_REQUIRE_BROWSER=1 (set by CI), where a missing browser is a failure.
Screenshots go to artifacts/feedback/ at the repository root.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from feedback_testing import ROOT, TOKENS, fake_server, write_raters

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "artifacts" / "feedback"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install playwright)"
    if reason is None and not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing; run .ci/install-browser.sh"
    if reason is not None:
        if os.environ.get("PALM_RLHF_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def sign_in(page, url: str, name: str, state: str = "ready") -> None:
    response = page.goto(url + "/")
    assert response.status == 401                     # not signed in yet: the sign-in page
    page.fill("#token", TOKENS[name])
    page.click("button.primary")
    page.wait_for_selector(f"body[data-state={state}]")


def expect_text(page, selector: str, text: str) -> None:
    # locator waits, not wait_for_function: the page's CSP forbids the eval that one needs
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_have_text(text)


def wait_count(page, n: int) -> None:
    expect_text(page, "#count-you", str(n))
    page.wait_for_selector("body[data-state=ready]")


def test_five_judgements_by_click_and_keyboard(browser, tmp_path, server_factory):
    write_raters(tmp_path / "raters.txt", ["alice", "bob"])
    db = tmp_path / "f.sqlite"
    server = server_factory(db, tmp_path / "raters.txt", "--two-checkpoints")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    sign_in(page, server.url, "alice")
    shown = []

    def current() -> str:
        shown.append(page.input_value("#pair-id"))
        return shown[-1]

    current()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "judging-page.png"), full_page=True)
    page.click("button.choice-a")                      # 1: click A
    wait_count(page, 1)

    current()
    page.keyboard.press("2")                           # 2: key 2 = B
    wait_count(page, 2)

    current()
    page.check("input[name=rating][value='4']")
    page.fill("#comment", "1 2 3 4: typing digits in the comment must not judge")
    page.focus("#comment")
    page.keyboard.type("1234")
    assert page.text_content("#count-you") == "2"      # keys typed into the comment are text
    page.click("button.choice-tie")                    # 3: click tie, with rating and comment
    wait_count(page, 3)
    assert page.input_value("#comment") == ""          # the form was reset for the next pair

    current()
    page.keyboard.press("4")                           # 4: key 4 = both bad
    wait_count(page, 4)

    current()
    page.check("input[name=rating][value='5']")
    page.keyboard.press("1")                           # 5: key 1 with a rating radio focused
    wait_count(page, 5)
    page.screenshot(path=str(ARTIFACTS / "after-five.png"), full_page=True)
    page.goto(server.url + "/stats")
    page.screenshot(path=str(ARTIFACTS / "stats-page.png"), full_page=True)
    print(f"screenshots in {ARTIFACTS}")
    page.close()

    with sqlite3.connect(db) as con:
        got = con.execute("SELECT issue_id, rater, choice, rating, comment FROM judgements ORDER BY id").fetchall()
    comment = "1 2 3 4: typing digits in the comment must not judge1234"
    assert got == [(shown[0], "alice", "a", None, ""), (shown[1], "alice", "b", None, ""),
                   (shown[2], "alice", "tie", 4, comment), (shown[3], "alice", "both_bad", None, ""),
                   (shown[4], "alice", "a", 5, "")]
    assert len(set(shown)) == 5


def test_xss_payloads_render_as_text(browser, tmp_path, server_factory):
    write_raters(tmp_path / "raters.txt", ["alice"])
    server = server_factory(tmp_path / "f.sqlite", tmp_path / "raters.txt", "--xss")
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, server.url, "alice")

    def check(n: int) -> None:
        # server-rendered (n = 0) and script-inserted (n = 1) pairs both show the literal text
        assert page.text_content("#prompt") == fake_server.XSS_PROMPT
        assert page.text_content("#completion-a") == f"{fake_server.XSS_A} #{n}"
        assert page.text_content("#completion-b") == f"{fake_server.XSS_B} #{n}"
        for element in ("#prompt", "#completion-a", "#completion-b"):
            assert page.locator(f"{element} *").count() == 0       # no element was created from the text
        assert page.evaluate("typeof window.__xss") == "undefined"  # and no payload ran

    check(0)
    page.keyboard.press("1")
    wait_count(page, 1)
    check(1)
    page.screenshot(path=str(ARTIFACTS / "xss-inert.png"), full_page=True)
    assert dialogs == []
    page.close()


def test_page_is_ready_only_once_its_keys_work(browser, tmp_path, server_factory):
    # the server renders "loading"; app.js says "ready" after adding its key handler, so a test
    # (or a quick rater) that waits for "ready" never presses a key nobody listens to yet
    write_raters(tmp_path / "raters.txt", ["alice"])
    server = server_factory(tmp_path / "f.sqlite", tmp_path / "raters.txt")
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    assert page.goto(server.url + "/").status == 401
    page.fill("#token", TOKENS["alice"])
    page.click("button.primary")
    page.wait_for_selector("#completion-a")
    assert page.get_attribute("body", "data-state") == "loading"
    context.close()


def test_a_waiting_page_polls_with_javascript_and_refreshes_without(browser, tmp_path, server_factory):
    """No pair until the test releases one, and the page does not wait: it renders "waiting". With
    JavaScript the page polls and shows the pair in place, still the same document 3.5 s after it
    loaded (a self-refresh would reload it under the rater: a key pressed, or a judgement sent,
    while it reloads is lost), and a key judges. Without JavaScript it refreshes itself until the
    pair is there."""
    write_raters(tmp_path / "raters.txt", ["alice"])
    release = tmp_path / "release"
    server = server_factory(tmp_path / "f.sqlite", tmp_path / "raters.txt", "--hold", str(release), "--page-wait", "0")
    page = browser.new_page()
    sign_in(page, server.url, "alice", state="waiting")
    page.evaluate("window.firstDocument = true")
    no_js = browser.new_context(java_script_enabled=False)
    static = no_js.new_page()
    assert static.goto(server.url + "/").status == 401
    static.fill("#token", TOKENS["alice"])
    static.click("button.primary")
    assert static.locator("#judge-form").is_hidden()          # no pair yet

    page.wait_for_timeout(3_500)                               # the old self-refresh came at 3 s
    release.touch()
    page.wait_for_selector("body[data-state=ready]")           # the pair, shown by the script
    assert page.evaluate("window.firstDocument") is True
    static.wait_for_selector("#judge-form", state="visible")   # a refresh (every 3 s) brought it
    assert static.input_value("#pair-id") == page.input_value("#pair-id")
    page.keyboard.press("1")
    expect_text(page, "#count-you", "1")
    no_js.close()
    page.close()
