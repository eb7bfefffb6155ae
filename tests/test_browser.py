"""The search page at ``/``, driven in a real browser against a real ``hybridsearch serve``.

Headless Chromium (Debian's ``chromium``, launched by Playwright from its path: no browser
download) loads the page from a ``hybridsearch serve`` subprocess on 127.0.0.1 over a small index
of readable sentences (tiny random BGE-M3-layout checkpoint: all four channels). What the page
shows is checked against ``index.search`` in this process and against the JSON API.

Skipped when Playwright, Chromium or the server extra is missing, unless
``HYBRIDSEARCH_REQUIRE_BROWSER=1`` (CI sets it): then that is a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import hybridsearch
from hybridsearch import HybridIndex

REQUIRE = os.environ.get("HYBRIDSEARCH_REQUIRE_BROWSER") == "1"
API_KEY = "page-test-key-0123456789"
QUERY = "fox river"

HOSTILE_TEXT = ('<script>window.__pwned = 1</script> a fox by the river '
                '<img src=x onerror="window.__pwned = 2"> &amp; <b>bold</b>')
DOCS = [
    ("fox-dog", "The red fox jumps over the sleeping dog near the river.", "en", 2019, "animals"),
    ("river-sea", "A river carries water and fine silt down to the sea.", "en", 2020, "nature"),
    ("dense", "Dense retrieval compares the embedding vectors of a query and a passage.", "en", 2021, "search"),
    ("sparse", "Sparse retrieval weighs the words that a query shares with a passage.", "en", 2021, "search"),
    ("bm25", "BM25 ranks documents by term frequency and inverse document frequency.", "en", 2022, "search"),
    ("colbert", "ColBERT scores every query token against every document token.", "en", 2022, "search"),
    ("hybrid", "Hybrid search fuses dense, sparse and keyword rankings into one list.", "en", 2023, "search"),
    ("renard", "Le renard roux saute par-dessus le chien endormi près de la rivière.", "fr", 2018, "animals"),
    ("riviere", "La rivière porte l'eau et la lumière jusqu'à la mer.", "fr", 2020, "nature"),
    ("fuchs", "Der schnelle braune Fuchs springt über den faulen Hund.", "de", 2017, "animals"),
    ("clouds", "Clouds gather over the river before the evening rain.", "en", 2024, "nature"),
    ("engine", "A search engine returns the passages that best answer a query.", "en", 2024, "search"),
    ("canids", "Foxes and dogs are both members of the canid family.", "en", 2016, "animals"),
    ("vectors", "Vector databases store embeddings for fast nearest neighbour search.", "en", 2023, "search"),
]


def corpus():
    docs = [{"id": i, "text": t, "metadata": {"lang": lang, "year": y, "topic": topic}}
            for i, t, lang, y, topic in DOCS]
    docs.append({"id": "hostile<i>", "text": HOSTILE_TEXT,
                 "metadata": {"lang": "en", "kind": "hostile", "note": '<img src=y onerror="window.__pwned = 3">'}})
    return docs


# --------------------------------------------------------------------------- what is needed


def _chromium() -> str | None:
    """$HYBRIDSEARCH_CHROMIUM if set (only it), else chromium on PATH or /usr/bin/chromium."""
    given = os.environ.get("HYBRIDSEARCH_CHROMIUM")
    for p in [given] if given else [shutil.which("chromium"), "/usr/bin/chromium"]:
        if p and os.access(p, os.X_OK):
            return p
    return None


def _missing() -> list[str]:
    out = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        out.append("the playwright package (pip install -e '.[dev]')")
    if _chromium() is None:
        out.append("chromium (apt-get install -y chromium)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        out.append("the server extra (pip install -e '.[server]')")
    return out


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        msg = "browser test needs " + ", ".join(missing)
        if REQUIRE:
            pytest.fail(msg + " (HYBRIDSEARCH_REQUIRE_BROWSER=1)")
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A ``hybridsearch serve`` subprocess (stopped by itself after ``timeout`` s at the latest)."""

    def __init__(self, folder: Path, key: str | None, timeout: int = 600):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(hybridsearch.__file__).parents[1]),
                                              os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("HYBRIDSEARCH_READ_KEY", None)
        env.pop("HYBRIDSEARCH_API_KEY", None)
        self.key = key
        keyed = []
        if key:
            key_file = folder.parent / "api-key"
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            keyed = ["--api-key-file", str(key_file)]
        self.log = None
        self._cmd = lambda port: ["timeout", str(timeout), sys.executable, "-m", "hybridsearch.cli", "serve",
                                  str(folder), "--host", "127.0.0.1", "--port", str(port), *keyed]
        self._folder, self._env = folder, env
        self._launch()

    def _launch(self):
        self.port = _free_port()
        self.log = open(self._folder.parent / f"serve-{self._folder.name}-{self.port}.log", "w+")
        # `timeout` forwards our SIGTERM to the server and stops it by itself if we die
        self.proc = subprocess.Popen(self._cmd(self.port), stdout=self.log, stderr=subprocess.STDOUT, env=self._env)

    def wait(self, seconds: float = 180) -> Served:
        """Until /ready answers; relaunched on another port if this one was taken meanwhile."""
        for _ in range(3):
            if self._wait_ready(seconds):
                return self
            out = self.output()
            self.stop()
            if "address already in use" not in out.lower():
                break
            self._launch()
        raise AssertionError("hybridsearch serve did not start:\n" + out)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def _wait_ready(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        return False

    def api(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def servers(browser, tmp_path_factory, m3_encoder, tiny_dense):
    """Two servers, started together (each start loads torch and the model: ~5 s idle, much more on
    a busy machine): "main" over the readable corpus in all four channels (two segments) with an
    API key, "dense_bm25" over the same corpus with a dense-only model plus BM25 and no key.
    Values: (index opened in this process, server)."""
    from hybridsearch import BGEM3Encoder

    made = {}
    root = tmp_path_factory.mktemp("page")
    idx = HybridIndex.create(root / "main" / "idx", m3_encoder)
    docs = corpus()
    idx.add(docs[:9])
    idx.add(docs[9:])
    made["main"] = (idx, Served(root / "main" / "idx", API_KEY))
    idx2 = HybridIndex.create(root / "dense_bm25" / "idx", BGEM3Encoder(tiny_dense, device="cpu"))
    idx2.add(docs)
    made["dense_bm25"] = (idx2, Served(root / "dense_bm25" / "idx", None))
    try:
        for _, srv in made.values():
            srv.wait()
        yield made
    finally:
        for _, srv in made.values():  # both shut down at once
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
        for i, srv in made.values():
            srv.stop()
            i.close()


@pytest.fixture(scope="module")
def served(servers):
    return servers["main"]


@pytest.fixture
def page(browser, served):
    """A fresh page on the served index with the API key typed in; fails the test on a JS error."""
    _, srv = served
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
    pg.goto(srv.url)
    pg.fill("#api-key", API_KEY)
    pg.dispatch_event("#api-key", "change")
    pg.wait_for_selector("#stats[data-loaded='1']")
    yield pg
    ctx.close()
    assert not errors, errors


# --------------------------------------------------------------------------- helpers


def searches(pg) -> int:
    return int(pg.evaluate("document.body.dataset.searches || '0'"))


def run(pg, action) -> None:
    """Do ``action`` (which starts one search) and wait until the page has shown its answer."""
    before = searches(pg)
    action()
    pg.wait_for_function(f"Number(document.body.dataset.searches || 0) > {before}", timeout=60_000)


def submit(pg, query=QUERY):
    pg.fill("#query", query)
    run(pg, lambda: pg.press("#query", "Enter"))


def shown(pg) -> list[dict]:
    """Each hit the page shows: id, fused score, text, metadata, contributions and bar geometry."""
    return pg.evaluate("""() => [...document.querySelectorAll('#hits > li')].map(li => ({
        id: li.dataset.id, score: Number(li.dataset.score),
        text: li.querySelector('.text').textContent,
        marks: [...li.querySelectorAll('.text mark')].map(m => m.textContent),
        metadata: Object.fromEntries([...li.querySelectorAll('.metadata > div')].map(
            d => [d.querySelector('dt').textContent, d.querySelector('dd').textContent])),
        bars: [...li.querySelectorAll('.bar')].map(b => {
            const t = b.parentElement.getBoundingClientRect(), r = b.getBoundingClientRect();
            return {channel: b.dataset.channel, value: Number(b.dataset.contribution),
                    left: (r.left - t.left) / t.width, width: r.width / t.width,
                    tip: b.closest('.bar-row').title};
        }),
        only: li.querySelector('.channel-only') ? li.querySelector('.channel-only').textContent : null,
    }))""")


def error_text(pg) -> str | None:
    return pg.evaluate("(() => { const e = document.getElementById('error');"
                       " return e.hidden ? null : e.textContent; })()")


def expect_same(hits_shown, hits):
    assert [h["id"] for h in hits_shown] == [h.id for h in hits]
    for s, h in zip(hits_shown, hits):
        assert s["score"] == pytest.approx(h.score, rel=1e-6, abs=1e-9)
        assert s["text"] == h.text  # exactly the document's text, nothing dropped or added


# --------------------------------------------------------------------------- tests


def test_hits_shown_are_the_index_hits_with_stats_latency_and_screenshot(page, served, tmp_path):
    idx, srv = served
    submit(page)
    got = shown(page)
    want = idx.search(QUERY, k=10)
    assert len(want) == 10
    expect_same(got, want)
    status, api = srv.api("search", {"query": QUERY, "k": 10})
    assert status == 200 and [h["id"] for h in api["hits"]] == [h["id"] for h in got]
    for s, h in zip(got, want):
        assert s["metadata"] == {k: v if isinstance(v, str) else json.dumps(v) for k, v in h.metadata.items()}
    summary = page.inner_text("#summary")
    assert re.search(r"^10 hits for hybrid · .*\d+(\.\d)? ms", summary), summary
    st = idx.stats()
    stats = {e.get_attribute("data-stat"): e.inner_text() for e in page.query_selector_all("#stats .stat")}
    assert stats["documents"].endswith(str(st["documents"])) and st["documents"] == len(DOCS) + 1
    assert stats["segments"].endswith(str(st["segments"]))
    assert stats["generation"].endswith(str(st["generation"]))
    assert stats["channels"].endswith("dense · sparse · ColBERT · BM25")
    # every mode is enabled on this index; the legend names the four channels
    assert page.eval_on_selector_all("#mode option", "os => os.filter(o => o.disabled).length") == 0
    assert page.inner_text("#legend").split() == ["dense", "sparse", "ColBERT", "BM25"]
    # every control has a label (screen readers), the results summary is announced
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select')].filter(e => !e.labels.length)"
                               ".map(e => e.id)")
    assert unlabelled == []
    assert page.get_attribute("#summary", "aria-live") == "polite" and page.get_attribute("#error", "role") == "alert"
    shot = tmp_path / "search-page.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_switching_modes_changes_the_hits_as_the_api_does(page, served):
    idx, srv = served
    submit(page)
    lists = {"hybrid": [h["id"] for h in shown(page)]}
    for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
        run(page, lambda: page.select_option("#mode", mode))  # changing the mode searches again
        assert page.get_attribute("#hits", "data-mode") == mode
        got = shown(page)
        expect_same(got, idx.search(QUERY, k=10, mode=mode))
        status, api = srv.api("search", {"query": QUERY, "k": 10, "mode": mode})
        assert status == 200 and [h["id"] for h in api["hits"]] == [h["id"] for h in got]
        lists[mode] = [h["id"] for h in got]
        if mode == "hybrid":
            assert all(len(h["bars"]) == 4 for h in got) and page.is_enabled("#w-bm25")
        else:  # one channel: its score, no bars, no weights
            assert all(not h["bars"] and h["only"].startswith({"colbert": "ColBERT", "bm25": "BM25"}.get(mode, mode))
                       for h in got)
            assert page.is_disabled("#w-dense") and page.is_disabled("#fusion")
    assert len({tuple(v) for v in lists.values()}) >= 3  # the modes do rank differently
    # BM25 only returns documents with a query term: the fr/de ones have neither "fox" nor "river"
    assert set(lists["bm25"]) <= {"fox-dog", "river-sea", "clouds", "canids", "hostile<i>"}
    # a smaller k shows fewer hits
    page.fill("#k", "3")
    submit(page)
    assert [h["id"] for h in shown(page)] == lists["hybrid"][:3]


def test_weights_from_the_sliders_reach_the_search(page, served):
    idx, _ = served
    page.fill("#w-dense", "0")
    page.fill("#w-bm25", "1")
    assert page.inner_text("#w-dense-value") == "0.00" and page.inner_text("#w-bm25-value") == "1.00"
    assert page.inner_text("#w-sparse-value") == "default"
    submit(page)
    want = idx.search(QUERY, k=10, weights={"dense": 0.0, "bm25": 1.0})
    got = shown(page)
    expect_same(got, want)
    assert all(h["bars"][0]["channel"] == "dense" and h["bars"][0]["value"] == 0 for h in got)
    assert any(h["bars"][3]["value"] != 0 for h in got)
    page.select_option("#fusion", "rrf")
    submit(page)
    expect_same(shown(page), idx.search(QUERY, k=10, weights={"dense": 0.0, "bm25": 1.0}, fusion="rrf"))
    page.click("#reset-weights")
    page.select_option("#fusion", "weighted")
    submit(page)
    expect_same(shown(page), idx.search(QUERY, k=10))


def test_bars_are_the_contributions_and_add_up_to_the_score(page, served):
    _, srv = served
    submit(page)
    got = shown(page)
    _, api = srv.api("search", {"query": QUERY, "k": 10})
    values = [b["value"] for h in got for b in h["bars"]]
    lo, hi = min(0.0, *values), max(0.0, *values)
    for h, a in zip(got, api["hits"]):
        assert [b["channel"] for b in h["bars"]] == ["dense", "sparse", "colbert", "bm25"]
        assert {b["channel"]: b["value"] for b in h["bars"]} == a["contributions"]
        assert math.fsum(b["value"] for b in h["bars"]) == pytest.approx(h["score"], rel=1e-9, abs=1e-12)
        for b in h["bars"]:
            # one scale for all hits: width |c| / (max - min), starting at 0 (the axis) for c >= 0
            assert b["width"] == pytest.approx(abs(b["value"]) / (hi - lo), abs=0.01)
            zero = -lo / (hi - lo)
            assert b["left"] == pytest.approx(zero if b["value"] >= 0 else zero - b["width"], abs=0.01)
            assert f"{b['value']:.4f}" in b["tip"] or f"{b['value']:.0f}" in b["tip"]  # the number on hover
    # the best hit's largest bar is the widest on the page
    assert max(b["width"] for b in got[0]["bars"]) > 0.2


def test_query_terms_are_highlighted(page, served):
    page.fill("#k", "20")  # every document
    submit(page)
    got = {h["id"]: h for h in shown(page)}
    assert {"fox-dog", "canids"} <= set(got)
    assert got["fox-dog"]["marks"] == ["fox", "river"]
    assert got["canids"]["marks"] == ["Foxes"]  # the same word, inflected
    for h in got.values():
        assert all(m.lower() in {"fox", "foxes", "river", "rivers"} for m in h["marks"]), h["marks"]
    assert got["renard"]["marks"] == []  # rivière is another word
    # common words are not marked while the query has others; alone, they are
    submit(page, "the fox and the river")
    got = {h["id"]: h for h in shown(page)}
    assert got["fox-dog"]["marks"] == ["fox", "river"]
    submit(page, "the")
    got = {h["id"]: h for h in shown(page)}
    assert got["fox-dog"]["marks"] == ["The", "the", "the"]


def test_filter_shows_only_matching_documents_and_errors_are_shown(page, served):
    idx, _ = served
    page.fill("#filter", '{"lang": "fr"}')
    submit(page)
    got = shown(page)
    want = idx.search(QUERY, k=10, filter={"lang": "fr"})
    expect_same(got, want)
    assert {h["id"] for h in got} == {"renard", "riviere"}
    assert all(h["metadata"]["lang"] == "fr" for h in got)
    page.fill("#filter", '{"year": {"gte": 2022}, "topic": "search"}')
    submit(page)
    got = shown(page)
    assert {h["id"] for h in got} == {"bm25", "colbert", "hybrid", "engine", "vectors"}
    expect_same(got, idx.search(QUERY, k=10, filter={"year": {"gte": 2022}, "topic": "search"}))
    # invalid JSON: refused in the page with a clear message; the old hits are gone
    page.fill("#filter", '{"lang": ')
    submit(page)
    assert "Filter is not valid JSON" in error_text(page)
    assert page.get_attribute("#filter", "aria-invalid") == "true"
    assert shown(page) == []
    page.fill("#filter", '["fr"]')
    submit(page)
    assert "Filter must be a JSON object" in error_text(page)
    # valid JSON the server refuses: its message is shown
    page.fill("#filter", '{"year": {"between": 3}}')
    submit(page)
    err = error_text(page)
    assert err.startswith("400") and "between" in err, err  # the server names what it refused
    assert shown(page) == []
    page.fill("#filter", "")
    submit(page)
    assert error_text(page) is None and len(shown(page)) == 10


def test_document_text_and_metadata_are_shown_as_text_never_run(page, served):
    page.fill("#filter", '{"kind": "hostile"}')
    submit(page, "fox script img")
    got = shown(page)
    assert [h["id"] for h in got] == ["hostile<i>"]
    assert got[0]["text"] == HOSTILE_TEXT
    assert got[0]["metadata"]["note"] == '<img src=y onerror="window.__pwned = 3">'
    assert page.inner_text("#hits .doc-id") == "hostile<i>"
    page.wait_for_timeout(300)  # an onerror handler, had one been made, would have run by now
    assert page.evaluate("window.__pwned") is None
    for sel in ("#hits script", "#hits img", "#hits b", "#hits i"):
        assert page.query_selector(sel) is None, sel
    # markup in the query does not become markup either
    submit(page, "<img src=z onerror=\"window.__pwned = 4\"> fox")
    assert page.evaluate("window.__pwned") is None and page.query_selector("#hits img") is None


def test_without_the_key_the_page_says_so(browser, served):
    _, srv = served
    ctx = browser.new_context()
    pg = ctx.new_page()
    try:
        pg.goto(srv.url)  # the page itself needs no key
        pg.wait_for_selector("#stats[data-loaded='error']")
        assert "401" in pg.inner_text("#stats")
        submit(pg)
        err = error_text(pg)
        assert err.startswith("401") and "API key" in err, err
        pg.fill("#api-key", "wrong")
        submit(pg)
        assert error_text(pg).startswith("401")
        pg.fill("#api-key", API_KEY)
        submit(pg)
        assert error_text(pg) is None and len(shown(pg)) == 10
        # the key stays for the tab (sessionStorage), not in any other storage
        pg.dispatch_event("#api-key", "change")
        assert pg.evaluate("sessionStorage.getItem('hybridsearch.apiKey')") == API_KEY
        assert pg.evaluate("localStorage.length") == 0
    finally:
        ctx.close()


def test_modes_of_missing_channels_are_disabled(browser, servers):
    idx, srv = servers["dense_bm25"]
    ctx = browser.new_context()
    try:
        pg = ctx.new_page()
        pg.goto(srv.url)
        pg.wait_for_selector("#stats[data-loaded='1']")
        disabled = pg.eval_on_selector_all("#mode option", "os => os.filter(o => o.disabled).map(o => o.value)")
        assert disabled == ["sparse", "colbert"]
        sliders = pg.query_selector_all("#weight-sliders input")
        assert [e.get_attribute("data-channel") for e in sliders] == ["dense", "bm25"]
        submit(pg)
        got = shown(pg)
        expect_same(got, idx.search(QUERY, k=10))
        assert all([b["channel"] for b in h["bars"]] == ["dense", "bm25"] for h in got)
        assert all(math.fsum(b["value"] for b in h["bars"]) == pytest.approx(h["score"], abs=1e-9) for h in got)
    finally:
        ctx.close()
