"""The web pages of `lmkit serve` in headless Chromium (Debian's chromium + chromium-driver, driven
by selenium): the chat page streams a reply, and the review page rates that completion, which
lands in the SQLite store."""
import shutil
import sqlite3

import pytest
from conftest import SERVER_KEY
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

# Counts how often the newest assistant reply's text changed (each streamed chunk changes it).
COUNT_UPDATES = """
window.replyUpdates = 0;
new MutationObserver((ms) => {
  for (const m of ms) {
    const t = m.target.nodeType === 1 ? m.target : m.target.parentElement;
    if (t && t.closest && t.closest('.assistant')) window.replyUpdates++;
  }
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert chromium and driver, "install chromium and chromium-driver (Debian packages; .ci/run does)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def test_chat_page_streams_and_review_page_rates(server, browser):
    b = browser
    wait = WebDriverWait(b, 30)
    b.get(server["base"] + "/")
    b.find_element(By.ID, "key").send_keys(SERVER_KEY)
    b.find_element(By.ID, "max_tokens").clear()
    b.find_element(By.ID, "max_tokens").send_keys("24")
    b.find_element(By.ID, "temperature").clear()
    b.find_element(By.ID, "temperature").send_keys("0")  # greedy: the same reply on every run
    b.execute_script(COUNT_UPDATES)
    b.find_element(By.ID, "input").send_keys("where is the dog?")
    b.find_element(By.ID, "send").click()
    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
    assert "error" not in reply.get_attribute("class"), reply.text
    text = reply.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    assert text.strip(), "empty reply"
    assert b.execute_script("return window.replyUpdates") >= 3, "the reply did not arrive in pieces"
    assert b.find_element(By.CSS_SELECTOR, ".msg.user .text").text == "where is the dog?"

    con = sqlite3.connect(server["db"])
    row = con.execute("SELECT id FROM completions WHERE endpoint = 'chat/completions' AND output = ? "
                      "ORDER BY created DESC LIMIT 1", (text,)).fetchone()
    assert row, f"the streamed reply {text!r} is not in the store"
    cid = row[0]

    b.get(server["base"] + "/review")
    b.find_element(By.ID, "key").send_keys(SERVER_KEY)
    b.find_element(By.ID, "reload").click()
    up = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"button.rate[data-id='{cid}'][data-rating='1']"))
    up.click()
    wait.until(lambda d: not d.find_elements(By.ID, "c-" + cid))
    assert con.execute("SELECT rating FROM completions WHERE id = ?", (cid,)).fetchone()[0] == 1
