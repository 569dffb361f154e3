"""Every HTML page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium).

One browser for the module. Each page kind is loaded from real documents (a real audit
of a real script, the shipped catalog, a real diff and prediction, and hostile copies)
and checked: no console error, no request leaving the file, sorting, the verdict chips'
filter, the phase/file/op filters and the URL fragment that keeps them, a row opening to
its detail, and injected names that stay text.

A missing browser fails these tests (naming what to install); ``OPAUDIT_SKIP_BROWSER=1``
makes them skip instead, for a machine that cannot have one.
"""

from __future__ import annotations

import os

import pytest
import yaml
from fixtures import browser
from fixtures.review import HOSTILE_TEXT, MODULE_NAME, SCRIPT_NAME, documents, has_avx2

from opaudit.data import across
from opaudit.data.report import load


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return documents(str(tmp_path_factory.getbasetemp() / "review"))


@pytest.fixture(scope="module")
def chrome():
    why = browser.missing()
    if why:
        if os.environ.get(browser.SKIP_ENV) == "1":
            pytest.skip(f"no browser ({why}); {browser.SKIP_ENV}=1")
        pytest.fail(f"the HTML browser tests need Chromium: {why}; set {browser.SKIP_ENV}=1 to skip them")
    with browser.chromium() as driver:
        yield driver


def _open(driver, path: str, fragment: str = "") -> str:
    """Load a page (logs drained first); its URL."""
    browser.console_errors(driver)
    browser.requests(driver)
    url = browser.file_url(path)
    browser.load(driver, url + fragment)
    return url


def _visible(driver, key: str) -> list[str]:
    """The text of column ``key`` in the main table's shown rows, in page order."""
    return driver.execute_script("""
        var t=document.querySelector('table.data.main'),i=-1;
        Array.prototype.forEach.call(t.tHead.rows[0].cells,function(h,j){if(h.getAttribute('data-key')===arguments[0])i=j;});
        return Array.prototype.filter.call(t.tBodies,function(b){return !b.hidden;})
          .map(function(b){return b.rows[0].cells[i].textContent;});""".replace("arguments[0]", repr(key)))


def _verdicts(driver) -> list[str]:
    return driver.execute_script("return Array.prototype.filter.call(document.querySelector('table.data.main')"
                                 ".tBodies,function(b){return !b.hidden;}).map(function(b){"
                                 "return b.getAttribute('data-verdict');})")


def _click_header(driver, key: str) -> None:
    driver.find_element("css selector", f"table.data.main th[data-key='{key}'] button").click()


def test_the_checks_catch_a_request_and_a_console_error(chrome, tmp_path):
    """The request and console checks below can fail: a page that fetches an image and logs an error is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom")</script></body></html>')
    url = _open(chrome, str(page))
    assert any("boom" in m for m in browser.console_errors(chrome))
    assert "http://127.0.0.1:9/x.png" in browser.requests(chrome, url)


@pytest.mark.parametrize("name", ["report", "hostile report", "catalog", "hostile catalog", "diff", "prediction",
                                  "replay", "hostile replay", "compare", "hostile compare"])
def test_a_page_opens_offline_without_errors_and_injected_names_stay_text(chrome, docs, name):
    url = _open(chrome, docs.pages[name])
    assert chrome.title
    assert browser.console_errors(chrome) == []
    assert browser.requests(chrome, url) == []
    assert browser.resources(chrome) == []
    # Markup in a file, module or op name, an error text or a catalog field created no element and ran nothing.
    state = chrome.execute_script(
        "return [Array.prototype.filter.call(document.scripts,function(s){return s.type!=='application/json';}).length,"
        "document.images.length, typeof window.pwned,"
        "document.querySelectorAll('[onerror],[onload],iframe,object,embed').length, document.body.innerText]")
    assert state[:4] == [1, 0, "undefined", 0]
    text = state[4]
    if name == "report":
        assert SCRIPT_NAME in text and MODULE_NAME in chrome.execute_script(
            "return document.querySelector('table.data.main').textContent")
    if name in ("replay", "compare"):
        assert SCRIPT_NAME in text
    if name.startswith("hostile") or name == "prediction":
        assert HOSTILE_TEXT.replace("\x07", "\\x07") in chrome.execute_script("return document.title") + text


SORTS = {"report": "first", "catalog": "op", "diff": "op", "prediction": "op", "replay": "op", "compare": "op"}
"""A column per page kind whose order differs from the page's own (worst first)."""


@pytest.mark.parametrize("name", sorted(SORTS))
def test_sorting_a_column_reorders_the_rows(chrome, docs, name):
    _open(chrome, docs.pages[name])
    key = SORTS[name]
    numeric = chrome.find_element("css selector", f"th[data-key='{key}']").get_attribute("data-type") == "num"

    def keys(values):
        return [float(v) for v in values] if numeric else [v.lower() for v in values]

    before = _visible(chrome, key)
    assert keys(before) != sorted(keys(before))  # the page's own order is not this column's
    _click_header(chrome, key)
    after = _visible(chrome, key)
    assert keys(after) == sorted(keys(after), reverse=numeric) and after != before  # numbers largest first
    if len(before) < 200:  # every row is listed: the same rows
        assert sorted(keys(after)) == sorted(keys(before))
    _click_header(chrome, key)
    assert keys(_visible(chrome, key)) == sorted(keys(_visible(chrome, key)), reverse=not numeric)
    assert f"sort={key}" in chrome.execute_script("return location.hash")


@pytest.mark.parametrize("name", ["report", "catalog", "diff", "prediction", "replay", "compare"])
def test_a_verdict_chip_shows_only_its_rows_and_the_link_keeps_the_view(chrome, docs, name):
    url = _open(chrome, docs.pages[name])
    every = _verdicts(chrome)
    total = chrome.execute_script("return JSON.parse(document.querySelector('table.data.main').nextElementSibling"
                                  ".textContent).c.length")
    chips = chrome.find_elements("css selector", ".chip:not([disabled])")
    chip = min(chips, key=lambda c: int(c.find_element("css selector", "b").text))  # the rarest verdict
    verdict, count = chip.get_attribute("data-verdict"), int(chip.find_element("css selector", "b").text)
    chip.click()
    shown = _verdicts(chrome)
    assert set(shown) == {verdict} and len(shown) == min(count, 200) < total
    assert chip.get_attribute("aria-pressed") == "true"
    assert chrome.find_element("id", "f-count").text == f"{count} of {total} rows shown"
    fragment = chrome.execute_script("return location.hash")
    assert "verdict=" in fragment
    # The same URL in a fresh load shows the same rows.
    browser.load(chrome, "about:blank")
    browser.load(chrome, url + fragment)
    assert _verdicts(chrome) == shown
    chrome.find_element("id", "f-reset").click()
    assert _verdicts(chrome) == every
    assert browser.console_errors(chrome) == []


def test_a_long_table_lists_200_rows_until_asked_for_all(chrome, docs):
    _open(chrome, docs.catalog_html)
    total = len(yaml.safe_load(open(docs.catalog_yaml))["entries"])
    assert len(_verdicts(chrome)) == 200 < total
    more = chrome.find_element("id", "f-more")
    assert more.is_displayed() and more.text == f"list all {total} (the first 200 are listed)"
    more.click()
    assert len(_verdicts(chrome)) == total and not more.is_displayed()
    assert "show=all" in chrome.execute_script("return location.hash")


def test_the_phase_file_and_op_filters(chrome, docs):
    _open(chrome, docs.report_html)
    from selenium.webdriver.support.ui import Select

    every = _visible(chrome, "phase")
    Select(chrome.find_element("id", "f-phase")).select_by_value("backward")
    phases = _visible(chrome, "phase")
    assert phases and all("backward" in p.split("/") for p in phases) and len(phases) < len(every)
    assert "phase=backward" in chrome.execute_script("return location.hash")
    Select(chrome.find_element("id", "f-phase")).select_by_value("")
    files = [o.get_attribute("value") for o in chrome.find_elements("css selector", "#f-file option")]
    assert files == ["", SCRIPT_NAME]
    Select(chrome.find_element("id", "f-file")).select_by_value(SCRIPT_NAME)
    assert len(_visible(chrome, "op")) == len(every)  # every site is in the one script
    chrome.find_element("id", "f-op").send_keys("RAND")
    ops = _visible(chrome, "op")
    assert sorted(ops) == ["aten.rand.default", "aten.randn.default"]
    assert chrome.find_element("id", "f-count").text == f"2 of {len(every)} rows shown"


def test_a_finding_opens_to_its_detail(chrome, docs):
    report = load(docs.report_yaml)
    put = report.finding("aten.put_.default")
    url = _open(chrome, docs.report_html)
    body = chrome.find_element("css selector", f"tbody[data-id='{put.id}']")
    assert len(body.find_elements("css selector", "tr")) == 1  # drawn when first opened
    body.find_element("css selector", "tr").click()
    detail = body.find_elements("css selector", "tr")[1]
    assert detail.is_displayed()
    text = detail.text
    for needle in ("does not have a deterministic implementation", put.remedy[:60], f"{SCRIPT_NAME}:{put.sites[0].line}",
                   put.signature):
        assert needle in text
    fragment = chrome.execute_script("return location.hash")
    assert f"open={put.id}" in fragment
    browser.load(chrome, "about:blank")
    browser.load(chrome, url + fragment)
    assert chrome.find_element("css selector", f"tbody[data-id='{put.id}'] tr + tr").is_displayed()
    # From the keyboard: a row takes the focus, Enter opens it.
    from selenium.webdriver.common.keys import Keys

    other = chrome.find_elements("css selector", "table.data.main > tbody")[-1]
    other.find_element("css selector", "tr").send_keys(Keys.ENTER)
    assert other.find_elements("css selector", "tr")[1].is_displayed()
    assert browser.console_errors(chrome) == []


@pytest.mark.skipif(not has_avx2(), reason="this CPU lacks AVX2: the capture and the replay ran the same kernels")
def test_the_replay_page_shows_the_environment_difference_above_its_rows_and_a_row_opens(chrome, docs):
    """A real capture under AVX2 kernels replayed under the scalar ones: what differs between the two machines is
    on screen above the table; the op whose bits moved is first and opens to how far they moved."""
    doc = across.from_dict(yaml.safe_load(open(docs.replay_yaml)))
    moved = next(r for r in doc.rows if r.across is across.Across.DIFFERS)
    _open(chrome, docs.replay_html)
    env = chrome.find_element("id", "environment")
    table = chrome.find_element("css selector", "table.data.main")
    assert env.is_displayed() and env.location["y"] < table.location["y"]
    rows = [r.text for r in env.find_elements("css selector", "tbody tr")]
    assert "cpu_capability AVX2 DEFAULT" in rows
    assert _verdicts(chrome)[0] == "differs"
    body = chrome.find_element("css selector", f"tbody[data-id='{moved.finding.id}']")
    body.find_element("css selector", "tr").click()
    text = body.find_elements("css selector", "tr")[1].text
    assert f"{moved.max_ulp} ULP" in text and moved.across.meaning in text and moved.finding.signature in text
    assert chrome.find_element("id", "magnitude").find_elements("css selector", "svg rect")
    # The linear layer's row: its module's hostile name (from the capsule) is text in the detail.
    linear = next(r for r in doc.rows if r.finding.op == "aten.addmm.default")
    body = chrome.find_element("css selector", f"tbody[data-id='{linear.finding.id}']")
    body.find_element("css selector", "tr").click()
    assert MODULE_NAME in body.find_elements("css selector", "tr")[1].text
    assert chrome.execute_script("return [document.images.length, typeof window.pwned]") == [0, "undefined"]
    assert browser.console_errors(chrome) == []


@pytest.mark.skipif(not has_avx2(), reason="this CPU lacks AVX2: both traces ran the same kernels")
def test_the_compare_page_opens_its_root_cause_and_a_hostile_structural_difference_stays_text(chrome, docs):
    """What differs between the runs is on screen above the table; the root cause's row opens to its op, line,
    phase, step and call; in the hostile copy a structural difference's calls open as text."""
    from opaudit.flows.trace.compare import compare_traces

    (r,) = compare_traces(*docs.traces).ranks
    _open(chrome, docs.compare_html)
    lead = chrome.find_element("id", "differences")
    table = chrome.find_element("css selector", "table.data.main")
    assert lead.is_displayed() and lead.location["y"] < table.location["y"]
    assert "environment cpu_capability AVX2 DEFAULT" in [row.text for row in lead.find_elements("css selector", "tbody tr")]
    assert _verdicts(chrome)[0] == "root_cause"
    body = chrome.find_elements("css selector", "table.data.main > tbody")[0]
    body.find_element("css selector", "tr").click()
    text = body.find_elements("css selector", "tr")[1].text
    for needle in (r.root_cause.op, r.root_cause.where, "setup", f"call #{r.root_cause.index_a}",
                   "identical in both runs"):
        assert needle in text
    assert chrome.find_element("id", "cause").find_elements("css selector", "svg")
    _open(chrome, docs.hostile_compare_html)
    chrome.find_element("css selector", ".chip[data-verdict='structural']").click()
    (body,) = [b for b in chrome.find_elements("css selector", "table.data.main > tbody") if b.is_displayed()]
    body.find_element("css selector", "tr").click()
    detail = body.find_elements("css selector", "tr")[1].text
    assert HOSTILE_TEXT.replace("\x07", "") in detail.replace("\x07", "")
    assert chrome.execute_script("return [document.images.length, typeof window.pwned]") == [0, "undefined"]
    assert browser.console_errors(chrome) == []
