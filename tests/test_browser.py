"""The search page in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path``; never a Playwright-downloaded browser) opens ``/``,
types a query, submits, and sees the ranked results the API gives.

The page is served by the same FastAPI app the Serve Router runs (``serve/api.py``), here
over real SciFact shards and MiniLM in this process, by uvicorn on 127.0.0.1, with the bearer
token on (``RETRIEVER_API_TOKEN``): the browser opens the page without any header, the page
asks for the token, the user types it, and the page sends it with each API call.
``scripts/install-browser.sh`` installs the browser and driver. Under CI (``CI=true``) a
missing browser FAILS this test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest

from serve.api import TOKEN_ENV
from tests.helpers import dataset, served
from tests.index_fixtures import cache_dir, scifact_minilm

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
TOKEN = "browser-test-token"
QUERY = "stem cells in cancer"


def require_browser() -> None:
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"{CHROMIUM} is missing (Debian package chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright Python package is missing")
    if problems:
        message = "; ".join(problems) + ": run scripts/install-browser.sh"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(pytestconfig, tmp_path_factory):
    require_browser()
    from retriever.index import shards as sh
    from serve.api import make_api
    from serve.local import LocalBackend

    cache = cache_dir(pytestconfig, tmp_path_factory)
    encoded = scifact_minilm(cache)
    index = str(tmp_path_factory.mktemp("browser") / "flat-2")
    sh.build(encoded.folder, index, 2, sh.IndexSpec("flat"))
    backend = LocalBackend(index, docs=dataset("scifact"), gpu="no")
    saved = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN
    try:
        api = make_api(backend)
    finally:
        if saved is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = saved
    with served(api) as url:
        yield url, backend


@pytest.mark.slow
@pytest.mark.timeout(900)  # its fixture may be the run's first SciFact encoding: 2-5 min here
def test_page_asks_for_the_token_then_shows_ranked_results(server):
    import httpx
    from playwright.sync_api import sync_playwright

    url, backend = server
    assert httpx.get(url + "/").status_code == 200  # the page needs no token ...
    assert httpx.get(url + "/info").status_code == 401  # ... the API does
    vector = backend.encoder.encode_queries([QUERY])
    from retriever.index.shards import search_all

    expected = [doc_id for doc_id, _ in search_all(backend.shards, vector, 5)[0]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()  # no header: as a person opens the page
            page.goto(url + "/")
            page.wait_for_selector("#auth[open] #token", timeout=30_000)  # it asks
            assert "asks for an API token" in page.text_content("#auth-prompt")
            page.fill("#token", "not-the-token")
            page.fill("#query", QUERY)
            page.fill("#top_k", "5")
            page.click("#go")
            page.wait_for_selector("#status.error", timeout=30_000)
            refused = page.text_content("#status")
            assert page.locator("#results li.hit").count() == 0
            page.fill("#token", TOKEN)
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('5 results')", timeout=60_000)
            shown = page.eval_on_selector_all("#results li.hit", "els => els.map(e => ("
                                              "{id: e.dataset.docId, title: e.querySelector("
                                              "'.title')?.textContent}))")
            status = page.text_content("#status")
            page.reload()  # the token stays with the tab (sessionStorage)
            page.wait_for_function(
                "document.getElementById('about').textContent.includes('5183 documents')")
            assert page.input_value("#token") == TOKEN
        finally:
            browser.close()
    assert refused.startswith("Error 401") and "wrong token" in refused
    assert [s["id"] for s in shown] == expected  # ranked as the API ranks them
    assert all(s["title"] == backend.doc(s["id"])[0] for s in shown)
    assert "partial" not in status
