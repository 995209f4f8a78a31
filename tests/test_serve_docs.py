"""The API's Swagger UI page (``GET /docs``) renders in headless Chromium behind the token.

The same FastAPI app the Serve Router runs (``serve/api.py``), over a small 4-shard index in
this process (no encoder is loaded: rendering the docs needs none), is served by uvicorn on
127.0.0.1 with the bearer token on. Chromium sends the token with every request (as a gateway
or a header extension would): the page, the OpenAPI document it fetches and Swagger UI's own
files (served by the app: no CDN). Without the token the page is refused. Browser driving as
in ``tests/test_browser.py`` (Debian's chromium through Playwright; skipped with the reason
outside CI when missing, failed under CI).
"""

from __future__ import annotations

import httpx
import pytest

from serve.api import TOKEN_ENV, make_api
from tests.helpers import served
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.test_serve import _small_index

TOKEN = "docs-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from serve.local import LocalBackend

    backend = LocalBackend(_small_index(tmp_path_factory.mktemp("docs"), 4), gpu="no")
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)
    try:
        api = make_api(backend)  # reads the token now
    finally:
        mp.undo()
    with served(api) as url:
        yield url


@pytest.mark.timeout(180)
def test_docs_render_in_chromium_and_show_the_search_operation(server):
    from playwright.sync_api import sync_playwright

    assert httpx.get(server + "/docs").status_code == 401
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            bare = browser.new_context().new_page()
            refused = bare.goto(server + "/docs")
            assert refused.status == 401
            page = browser.new_context(
                extra_http_headers={"Authorization": f"Bearer {TOKEN}"}).new_page()
            page.goto(server + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=60_000)
            paths = page.eval_on_selector_all(".opblock-summary-path",
                                              "els => els.map(e => e.textContent.trim())")
            title = page.text_content(".info .title")
            summary = page.text_content("#operations-default-search_search_post")
        finally:
            browser.close()
    assert "/search" in paths and "/v1/embeddings" in paths and "/info" in paths
    assert "llm-retriever search" in title
    assert "Search the index" in summary
