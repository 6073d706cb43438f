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


def start_server(lmkit_bin, *args):
    import subprocess
    proc = subprocess.Popen([lmkit_bin, "serve", *map(str, args), "--port", "0"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "serving" in line, line
    return proc, "http://" + line.split("on http://")[1].split()[0]


def test_review_export_dpo_serve_loop(lmkit, browser, tmp_path):
    """The preference loop end to end: completions served, picked on /review in the browser,
    exported, tuned on with `lmkit dpo` (LoRA), and the tuned adapter served."""
    import json
    import os
    import urllib.request
    from conftest import ROOT
    from test_finetune import make_base
    lmkit_bin = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    _, base = make_base(lmkit, tmp_path)
    db = tmp_path / "db.sqlite"

    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    proc, url = start_server(lmkit_bin, base, "--db", db, "--model-name", "base")
    try:
        for i, prompt in enumerate(["where is the cat?", "what is one plus two?", "where is the dog?"]):
            post(url + "/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 6, "temperature": 1.0,
                                           "n": 2, "seed": i})
        b = browser
        wait = WebDriverWait(b, 30)
        b.get(url + "/review")
        con = sqlite3.connect(db)
        from selenium.common.exceptions import StaleElementReferenceException

        def click(by, what):
            """Clicks the first element found; the page may be replacing it as it is clicked,
            and then it is looked up afresh."""
            def attempt(d):
                try:
                    found = d.find_elements(by, what)
                    if found:
                        found[0].click()
                        return True
                except StaleElementReferenceException:
                    pass
                return False
            wait.until(attempt)

        for n in range(1, 4):
            click(By.ID, "prefer-A")
            wait.until(lambda d: con.execute("SELECT COUNT(*) FROM preferences").fetchone()[0] == n)
        # Thumbs up on one completion, down on another (the unpaired rows KTO reads).
        for n, rating in enumerate([1, -1], start=1):
            click(By.CSS_SELECTOR, f"button.rate[data-rating='{rating}']")
            wait.until(lambda d: con.execute("SELECT COUNT(*) FROM completions WHERE rating IS NOT NULL")
                       .fetchone()[0] == n)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lmkit("data", "export-ratings", "--db", db, "--output", tmp_path / "ratings.jsonl")
    rated = [json.loads(line) for line in (tmp_path / "ratings.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in rated) == [False, True] and all(r["prompt"] for r in rated), rated
    lmkit("data", "export-preferences", "--db", db, "--output", tmp_path / "prefs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["chosen"] != r["rejected"] and r["prompt"] for r in rows), rows
    (tmp_path / "dpo.toml").write_text(
        f'base = "{base}"\n[data]\ntrain = "{tmp_path}/prefs.jsonl"\nval_fraction = 0.0\n'
        f'[train]\nout_dir = "{tmp_path}/dpo"\nmax_steps = 3\nbatch_size = 3\nseq_len = 64\nlr = 1e-2\n'
        f'eval_every = 0\nsave_every = 3\nlog_every = 1\n[lora]\nr = 4\nalpha = 8\ntarget_modules = "all-linear"\n')
    lmkit("dpo", "--config", tmp_path / "dpo.toml")
    steps = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"], steps
    proc, url = start_server(lmkit_bin, base, "--model-name", "base", "--adapter", f"tuned={tmp_path}/dpo",
                             "--db", tmp_path / "db2.sqlite")
    try:
        got = post(url + "/v1/completions", {"model": "tuned", "prompt": rows[0]["prompt"], "max_tokens": 6,
                                             "temperature": 0})
        assert got["model"] == "tuned" and got["choices"][0]["text"] is not None, got
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_review_page_shows_conversations_counts_and_takes_keys(server, browser, tmp_path):
    """The review page shows a chat completion as role-labelled messages with the model and
    settings that produced it, counts progress, rates the highlighted card with the + key, filters
    to rated completions, and exports ratings."""
    import json
    import urllib.request

    def call(path, body=None):
        req = urllib.request.Request(server["base"] + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {SERVER_KEY}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read().decode()

    reply = json.loads(call("/v1/chat/completions", {
        "model": "tiny", "max_tokens": 5, "temperature": 0.7, "seed": 3,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "where is the mat?"}]}))
    cid = reply["id"]
    con = sqlite3.connect(server["db"])
    stored = con.execute("SELECT id FROM completions WHERE request_id = ?", (cid,)).fetchone()[0]
    b = browser
    wait = WebDriverWait(b, 30)
    b.set_window_size(1200, 900)
    b.get(server["base"] + "/review")
    b.find_element(By.ID, "key").send_keys(SERVER_KEY)
    b.find_element(By.ID, "reload").click()
    card = wait.until(lambda d: d.find_element(By.ID, "c-" + stored))
    roles = [e.text.lower() for e in card.find_elements(By.CSS_SELECTOR, ".conversation .role")]
    assert roles == ["system", "user"], roles
    assert "where is the mat?" in card.text and "tiny" in card.text and "temperature 0.7" in card.text, card.text
    wait.until(lambda d: "completions rated" in d.find_element(By.ID, "stats").text)
    before = con.execute("SELECT COUNT(*) FROM completions WHERE rating IS NOT NULL").fetchone()[0]
    first = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#list .card.focus"))
    first_id = first.get_attribute("id")[2:]
    b.save_screenshot(str(tmp_path / "review.png"))
    b.find_element(By.TAG_NAME, "body").send_keys("+")
    wait.until(lambda d: con.execute("SELECT rating FROM completions WHERE id = ?", (first_id,)).fetchone()[0] == 1)
    assert con.execute("SELECT COUNT(*) FROM completions WHERE rating IS NOT NULL").fetchone()[0] == before + 1
    from selenium.webdriver.support.ui import Select
    Select(b.find_element(By.ID, "filter")).select_by_value("rated")
    wait.until(lambda d: d.find_elements(By.ID, "c-" + first_id) and "rated good" in d.find_element(By.ID, "c-" + first_id).text)
    lines = [json.loads(x) for x in call("/review/api/export?kind=ratings").splitlines()]
    assert any(x["label"] is True for x in lines), lines
    stats = json.loads(call("/review/api/stats"))
    assert stats["rated"] == before + 1 and "tiny" in stats["models"], stats
    # A corrected answer with a comment: exported as a fine-tuning conversation.
    second = json.loads(call("/v1/chat/completions", {
        "model": "tiny", "max_tokens": 4, "temperature": 0.7, "seed": 4,
        "messages": [{"role": "user", "content": "and the dog?"}]}))["id"]
    sid = con.execute("SELECT id FROM completions WHERE request_id = ?", (second,)).fetchone()[0]
    Select(b.find_element(By.ID, "filter")).select_by_value("unrated")
    card = wait.until(lambda d: d.find_element(By.ID, "c-" + sid))
    card.find_element(By.CSS_SELECTOR, "input.comment").send_keys("too vague")
    card.find_element(By.CSS_SELECTOR, "button.correct").click()
    box = card.find_element(By.CSS_SELECTOR, "textarea.correction")
    box.clear()
    box.send_keys("on the log.")
    card.find_element(By.CSS_SELECTOR, "button.save-correction").click()
    wait.until(lambda d: con.execute("SELECT correction FROM completions WHERE id = ?", (sid,)).fetchone()[0])
    assert con.execute("SELECT rating, comment, correction FROM completions WHERE id = ?", (sid,)).fetchone() == \
        (-1, "too vague", "on the log.")
    rows = [json.loads(x) for x in call("/review/api/export?kind=corrections").splitlines()]
    assert {"messages": [{"role": "user", "content": "and the dog?"},
                         {"role": "assistant", "content": "on the log."}]} in rows, rows
    # Date and moderation filters: the page's controls and the API behind them.
    import datetime
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    ids = lambda q: [c["id"] for c in json.loads(call("/review/api/recent?" + q))["data"]]
    assert sid in ids(f"since={today}&until={today}&flagged=false")
    assert ids("until=1970-01-02") == [] and ids("flagged=true") == []
    try:
        call("/review/api/recent?since=yesterday")
        assert False, "a bad date is refused"
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "YYYY-MM-DD" in e.read().decode()
    Select(b.find_element(By.ID, "filter")).select_by_value("all")
    wait.until(lambda d: d.find_elements(By.ID, "c-" + sid))
    b.execute_script("const e = document.getElementById('since'); e.value = '2999-01-01';"
                     "e.dispatchEvent(new Event('change'));")
    wait.until(lambda d: "Nothing here." in d.find_element(By.ID, "list").text)
    b.execute_script("const e = document.getElementById('since'); e.value = '';"
                     "e.dispatchEvent(new Event('change'));")
    Select(b.find_element(By.ID, "flagged")).select_by_value("false")
    wait.until(lambda d: d.find_elements(By.ID, "c-" + sid))
    b.save_screenshot(str(tmp_path / "review-filters.png"))
