"""The operator console in a real browser: Debian's headless Chromium driven by Selenium through
chromedriver, against a real ``gateway serve`` with a token file of every role.

The page lists the models; a split changed on the page is what ``gateway traffic show`` prints,
what requests get (tritonclient) and what the audit view shows with its author; a viewer sees no
change controls and the server refuses the change when it is tried anyway; the approval gate
blocks a rollout of an unapproved version, the publisher cannot approve it, a second identity
can, and the rollout then runs. Skipped without chromium/chromedriver/selenium, except in CI
(CI set), where their absence fails.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from consolekit import (
    api,
    build_repository,
    cli,
    model_file,
    publish,
    served_versions,
    token,
    write_tokens,
)
from support import start_gateway

from bench import models

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1500,1100")
WAIT_S = 30


@pytest.fixture(scope="module")
def chromium():
    """(chromium, chromedriver) paths; skip when absent (fail in CI)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver))
               if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        why = f"the console's browser tests need {', '.join(missing)} (apt-get install " \
              "chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why + "; .ci/run installs them")
        pytest.skip(why)
    return browser, driver


@pytest.fixture
def browser(chromium, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, chromium):
    root = tmp_path_factory.mktemp("console_browser")
    repo = build_repository(root / "repo")
    tokens = write_tokens(root / "tokens")
    with start_gateway(repo, "--auth-tokens", str(tokens)) as gateway:
        yield gateway


# ---- driving the page ----------------------------------------------------------------------------

def wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; message: "
                             f"{text(driver, '#message')!r}; browser log: "
                             f"{driver.get_log('browser')}") from None


def find(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def fresh(action):
    """Run ``action`` again when the page re-rendered what it held (it redraws every poll)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return action()
        except StaleElementReferenceException:
            time.sleep(0.05)
    return action()


def text(driver, selector: str) -> str:
    def read():
        found = find(driver, selector)
        return found[0].text if found else ""
    return fresh(read)


def sign_in(driver, gw, who: str) -> None:
    """Open the console and sign in with ``who``'s token through the sign-in form."""
    driver.get(f"http://{gw.http_url}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"http://{gw.http_url}/ui/")
    wait(driver, lambda d: find(d, "#login") and find(d, "#login")[0].is_displayed(),
         "the sign-in form")
    field = find(driver, "#token-input")[0]
    field.clear()
    field.send_keys(token(who))
    find(driver, "#token-save")[0].click()
    wait(driver, lambda d: text(d, "#who") == who, f"the session of {who}")


def open_model(driver, name: str) -> None:
    click(driver, f'#models tr[data-model="{name}"]')
    wait(driver, lambda d: text(d, "#detail-title") == f"Model {name}", f"model {name} opened")


def message(driver, expected: str) -> str:
    wait(driver, lambda d: expected in text(d, "#message"), f"the message {expected!r}")
    return text(driver, "#message")


def click(driver, selector: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked(d):
        try:
            found = find(d, selector)
            if not found or not found[0].is_enabled():
                return False
            found[0].click()
            return True
        except StaleElementReferenceException:
            return False
    wait(driver, clicked, f"a click on {selector}")


def audit_rows(driver, model: str) -> list[list[str]]:
    from selenium.webdriver.support.ui import Select

    click(driver, "#tab-audit")
    Select(find(driver, "#audit-model")[0]).select_by_value(model)
    wait(driver, lambda d: text(d, "#audit-count").endswith("records"), "the audit trail")
    time.sleep(0.5)  # the filter's debounce, then the reload
    wait(driver, lambda d: text(d, "#audit-count").endswith("records"), "the audit trail")
    return fresh(lambda: [[cell.text for cell in row.find_elements("css selector", "td")]
                          for row in find(driver, "#audit tbody tr")])


# ---- the tests -----------------------------------------------------------------------------------

def test_the_page_lists_the_models_after_sign_in(browser, gw):
    browser.get(f"http://{gw.http_url}/ui")  # redirected to /ui/
    wait(browser, lambda d: find(d, "#login")[0].is_displayed(), "the sign-in form")
    assert "missing credentials" in text(browser, "#login-error")
    find(browser, "#token-input")[0].send_keys("not-a-valid-token-at-all")
    find(browser, "#token-save")[0].click()
    wait(browser, lambda d: text(d, "#login-error") == "invalid token", "the refusal")
    sign_in(browser, gw, "vera")
    wait(browser, lambda d: len(find(d, "#models tbody tr[data-model]")) == 2, "two models")
    names = fresh(lambda: [row.get_attribute("data-model")
                           for row in find(browser, "#models tbody tr")])
    assert names == ["gated", "split"]
    assert text(browser, "#role") == "viewer"
    assert "approval required" in text(browser, '#models tr[data-model="gated"]')
    open_model(browser, "gated")
    assert "holds traffic on version 1" in text(browser, "#detail-notes")
    assert fresh(lambda: [row.get_attribute("data-version")
                          for row in find(browser, "#versions tbody tr")]) == ["2", "1"]
    # No script errors and nothing blocked by the page's Content-Security-Policy (the 401s of
    # signing in are network entries).
    problems = [e for e in browser.get_log("browser") if e["source"] != "network"
                or "401" not in e["message"]]
    assert problems == []


def test_a_split_changed_on_the_page_is_served_shown_and_audited(browser, gw):
    sign_in(browser, gw, "olivia")
    open_model(browser, "split")
    for version, weight in (("1", "30"), ("2", "70")):
        field = find(browser, f'#split-form input[data-split-version="{version}"]')[0]
        field.clear()
        field.send_keys(weight)
    click(browser, "#split-apply")
    assert message(browser, "split 1=30% 2=70%") == "model split: split 1=30% 2=70%"
    wait(browser, lambda d: text(d, "#split-now") == "v1: 30% · v2: 70%", "the new split")
    shown = cli(gw, "traffic", "show", "split", who="vera")
    assert "split:      1=30% 2=70%" in shown.stdout, shown.stdout + shown.stderr
    counts = served_versions(gw, "split", 300)
    assert set(counts) == {"1", "2"} and 160 <= counts["2"] <= 260, counts
    rows = audit_rows(browser, "split")
    assert rows[0][2:5] == ["olivia", "split", "set"], rows[0]
    assert rows[0][5].endswith("-> 1=30% 2=70%")
    assert find(browser, "#export-csv") and find(browser, "#export-jsonl")


def test_a_viewer_sees_no_change_controls_and_the_server_refuses_them(browser, gw):
    before = api(gw, "GET", "overview", "vera")[1]
    sign_in(browser, gw, "vera")
    open_model(browser, "split")
    wait(browser, lambda d: find(d, "#read-only"), "the read-only note")
    assert "read-only: the role viewer cannot change traffic or rollouts" in \
        text(browser, "#read-only")
    for control in ("#split-apply", "#split-clear", "#shadow-set", "#rollout-start",
                    "button[data-approve]"):
        assert not find(browser, control), control
    # Tried anyway, from the page's own origin with the viewer's token: refused by the server.
    status, body = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('api/models/split/split', {method: 'POST', headers: {
            'Content-Type': 'application/json',
            'Authorization': 'Bearer ' + sessionStorage.getItem('gateway-token')},
          body: JSON.stringify({weights: {'1': 100}})})
          .then(async (r) => done([r.status, await r.json()]));""")
    assert (status, body) == (403, {"error": "this call needs the operator role; the token "
                                             "has 'viewer'"})
    after = api(gw, "GET", "overview", "vera")[1]
    split = [m["split"] for m in after["models"] if m["name"] == "split"]
    assert split == [m["split"] for m in before["models"] if m["name"] == "split"]


def test_the_approval_gate_blocks_a_rollout_until_a_second_identity_approves(browser, gw,
                                                                             tmp_path):
    from selenium.webdriver.support.ui import Select

    assert publish(gw, "gated", model_file(tmp_path, seed=3), who="alice") == "3"
    sign_in(browser, gw, "olivia")
    open_model(browser, "gated")
    wait(browser, lambda d: find(d, '#versions tr[data-version="3"]'), "version 3")
    assert "not approved" in text(browser, '#versions tr[data-version="3"] .approval')
    assert not find(browser, "button[data-approve]")  # an operator does not approve
    Select(find(browser, "#rollout-to")[0]).select_by_value("3")
    click(browser, "#rollout-start")
    assert message(browser, "requires approval") == (
        "refused (400): model 'gated' requires approval (gateway.yaml require_approval): "
        "version 3 is not approved, so a rollout cannot give it traffic; someone other than "
        "the publisher must approve first (gateway approve gated 3, or the console)")

    sign_in(browser, gw, "alice")  # the publisher
    open_model(browser, "gated")
    click(browser, 'button[data-approve="3"]')
    assert message(browser, "cannot approve") == (
        "refused (403): alice published version 3 of model 'gated' and cannot approve it: "
        "the approval gate needs someone else")
    assert served_versions(gw, "gated", 30) == {"1": 30}

    sign_in(browser, gw, "bob")
    open_model(browser, "gated")
    click(browser, 'button[data-approve="3"]')
    assert message(browser, "approved by") == "model gated version 3 approved by bob"
    wait(browser, lambda d: "approved by bob" in text(d, '#versions tr[data-version="3"] '
                                                         '.approval'), "the approval shown")

    sign_in(browser, gw, "olivia")
    open_model(browser, "gated")
    Select(find(browser, "#rollout-to")[0]).select_by_value("3")
    steps = find(browser, "#rollout-steps")[0]
    steps.clear()
    steps.send_keys("20,100")
    click(browser, "#rollout-start")
    assert message(browser, "started") == \
        "model gated: rollout to version 3 started at 20% (baseline 1)"
    wait(browser, lambda d: "is running" in text(d, "#rollout-state"), "the running rollout")
    counts = served_versions(gw, "gated", 300)
    assert set(counts) == {"1", "3"} and 25 <= counts["3"] <= 110, counts
    click(browser, "#rollout-pause")
    message(browser, "rollout paused")
    click(browser, "#rollout-abort")
    wait(browser, lambda d: text(d, "#rollout-abort") == "Click again to abort", "arming")
    click(browser, "#rollout-abort")
    message(browser, "rollout aborted")
    assert served_versions(gw, "gated", 30) == {"1": 30}
    rows = [row[2:5] for row in audit_rows(browser, "gated")]
    for expected in (["olivia", "gated", "gate-refused"], ["alice", "gated", "approve-refused"],
                     ["bob", "gated", "approve"], ["olivia", "gated", "rollout-start"],
                     ["olivia", "gated", "rollout-aborted"]):
        assert expected in rows, (expected, rows)


def test_fifty_models_of_three_versions_stay_usable(browser, tmp_path):
    """50 models x 3 versions: the page lists them all and opens one quickly (the time is
    printed; the bound is generous, for slow shared machines)."""
    repo = tmp_path / "repo"
    for m in range(50):
        for version in (1, 2, 3):
            models.make_version(repo, f"model_{m:02d}", version, models.build_identity, "FP32")
        models.write_config(repo / f"model_{m:02d}", "max_batch_size: 4\n"
                                                     "version_policy { all { } }")
    with start_gateway(repo, timeout=300) as big:
        assert api(big, "GET", "overview")[0] == 200  # warm: the first rate sample
        started = time.monotonic()
        browser.get(f"http://{big.http_url}/ui/")
        wait(browser, lambda d: len(find(d, "#models tbody tr[data-model]")) == 50,
             "50 models listed")
        listed = time.monotonic() - started
        open_model(browser, "model_49")
        wait(browser, lambda d: len(find(d, "#versions tbody tr[data-version]")) == 3,
             "three versions")
        opened = time.monotonic() - started
        _, body, _ = api(big, "GET", "overview", raw=True)
        print(f"\n50 models x 3 versions: listed in {listed:.2f} s, one opened at "
              f"{opened:.2f} s; overview {len(body) / 1024:.0f} KiB")
        assert listed < 15 and opened < 20
