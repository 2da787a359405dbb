"""The static leaderboard site: files, numbers (against the CSVs), links, and a real browser.

The browser tests drive Debian's Chromium through Selenium and chromedriver. They skip only
when the browser, the driver or selenium is truly absent (CI installs them: .ci/run).
Screenshots of each page type go to ``$CERTBENCH_TEST_ARTIFACTS`` (default
``tests-artifacts/``).
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from bench.cli import main
from bench.leaderboard import build_boards
from bench.site import build_site
from bench.site.pages import board_context, row_context
from bench.spec import CellConfig
from bench.store import Store

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("CERTBENCH_TEST_ARTIFACTS") or ROOT / "tests-artifacts")
# committed site -> the directory of the committed CSVs it was generated with
COMMITTED = {
    "digits": ROOT / "leaderboards",
    "fashion-mnist": ROOT / "leaderboards" / "fashion-mnist",
}

# ---------------------------------------------------------------------------- a store

THREAT = {"radii": [0.0, 0.25, 0.5], "thresholds": [0.1], "eps": [0.25, 0.5]}
ATTACK = {"library": "certbench", "name": "pgd", "params": {"steps": 3}, "limit": None}
# an attack ensemble ([[attacks]]) as the spec stores it, for one of the rows
ENSEMBLE = [
    {**ATTACK, "eps": None},
    {"library": "autoattack", "name": "apgd", "params": {}, "limit": 10, "eps": [0.5]},
]
# defense, params, label, seeds, accuracy, other metrics (None = undefined)
ROWS: list[tuple[str, dict[str, Any], str | None, tuple[int, ...], float, dict[str, Any]]] = [
    ("undefended", {}, None, (0,), 0.96, {"accuracy_under_attack@0.25": 0.84,
                                          "accuracy_under_attack@0.5": 0.52}),
    ("randomized-smoothing", {"sigma": 0.25}, "smoothing σ=0.25", (0, 1), 0.92,
     {"guaranteed_accuracy@0": 0.92, "guaranteed_accuracy@0.25": 0.75,
      "guaranteed_accuracy@0.5": 0.42, "accuracy_under_attack@0.25": 0.8,
      "accuracy_under_attack@0.5": 0.46}),
    ("randomized-smoothing", {"sigma": 0.5}, None, (0,), 0.85,
     {"guaranteed_accuracy@0": 0.85, "guaranteed_accuracy@0.25": 0.7,
      "guaranteed_accuracy@0.5": 0.55, "accuracy_under_attack@0.25": 0.8,
      "accuracy_under_attack@0.5": 0.6}),
    ("pixeldp", {"note": "<script>alert(1)</script>"}, None, (0,), 0.87,
     {"guaranteed_accuracy@0": 0.87, "guaranteed_accuracy@0.25": 0.07,
      "guaranteed_accuracy@0.5": 0.0, "robust_precision@0.1": 0.98, "coverage@0.1": 0.48,
      "accuracy_under_attack@0.25": 0.78, "accuracy_under_attack@0.5": None}),
    ("madry", {"eps": 0.1}, "<b>Madry</b>", (0,), 0.92, {"accuracy_under_attack@0.25": 0.8,
                                                         "accuracy_under_attack@0.5": 0.5}),
    ("my-plugin", {}, None, (0,), 0.5, {}),
]  # fmt: skip
WEIGHTS = "0123456789abcdef" * 4


def _put(store: Store, defense: str, params: dict, label: str | None, seed: int, norm: str,
         metrics: dict[str, Any], *, spec: str = "t") -> None:  # fmt: skip
    cell = CellConfig(
        spec_name=spec, dataset="digits", data_dir=None, limit_train=None, limit_test=20,
        model="cnn", defense=defense, label=label, params=params, norm=norm, seed=seed,
        train={"epochs": 2}, eval={"alpha": 0.001}, threat=THREAT,
        attack=(ENSEMBLE if defense == "madry" else ATTACK)
        if any("attack" in k for k in metrics) else None,
        device="cpu",
    )  # fmt: skip
    shift = 0.01 * seed  # seeds differ, so the row's value is a mean
    values = {k: None if v is None else round(v - shift, 6) for k, v in metrics.items()}
    result = {
        "metrics": values,
        "n_test": 20,
        "n_draws": 100 if defense != "undefended" else None,
        "alpha": 0.001,
        "attack": "certbench:pgd" if cell.attack else None,
        "train_seconds": 1.5 + seed,
        "eval_seconds": 0.25,
        "provenance": {
            "certbench_version": "0.1.0",
            "torch_version": "2.13.0+cpu",
            "git_commit": "abc123",
            "created_at": f"2026-01-0{1 + seed}T00:00:00+00:00",
            "weights_sha256": WEIGHTS,
        },
    }
    assert store.put(cell, result)


def make_store(path: Path) -> Store:
    store = Store(path)
    for defense, params, label, seeds, acc, metrics in ROWS:
        for seed in seeds:
            for norm in ("l2", "linf"):
                _put(store, defense, params, label, seed, norm, {"accuracy": acc, **metrics})
    return store


@dataclass(frozen=True)
class FakeCitation:
    title: str
    authors: tuple[str, ...]
    venue: str
    year: int
    url: str
    bibtex: str


class FakeSmoothing:
    """Randomized smoothing, a fake for the site's tests."""

    randomized = True
    certifies = ("l2",)
    citation = FakeCitation(
        title="Certified Adversarial Robustness via Randomized Smoothing",
        authors=("Jeremy Cohen", "Elan Rosenfeld", "Zico Kolter"),
        venue="ICML",
        year=2019,
        url="https://arxiv.org/abs/1902.02918",
        bibtex="@inproceedings{cohen19,\n  title={Certified Adversarial Robustness},\n}",
    )


class FakeUndefended:
    """No defense."""


def fake_lookup(name: str) -> Any:
    return {"randomized-smoothing": FakeSmoothing, "undefended": FakeUndefended}.get(name)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return make_store(tmp_path_factory.mktemp("store") / "s.sqlite")


@pytest.fixture(scope="module")
def site(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    index = build_site(store, out, defense_class=fake_lookup)
    assert index == out / "index.html"
    return out


# ---------------------------------------------------------------------------- HTML reading


class Page(HTMLParser):
    """What the tests read from a generated page: ids, links, the board table's rows (each
    ``{column: data-value}``) and every other ``data-column``/``data-value`` pair."""

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.path = path
        self.ids: list[str] = []
        self.links: list[tuple[str, str]] = []  # (href or src, class)
        self.rows: list[dict[str, str]] = []
        self.row_ids: list[str] = []
        self.values: dict[str, str] = {}
        self.svgs: list[dict[str, str]] = []
        self.svg_titles = 0
        self._in_board = False
        self._in_body = False
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("href", "src"):
            if key in a and tag in ("a", "link", "script", "img"):
                self.links.append((a[key], a.get("class", "")))
        if tag == "svg":
            self.svgs.append(a)
        if tag == "title" and self.svgs:
            self.svg_titles += 1
        if tag == "table" and a.get("id") == "board":
            self._in_board = True
        if self._in_board and tag == "tbody":
            self._in_body = True
        if self._in_body and tag == "tr":
            self.rows.append({})
            self.row_ids.append(a["data-row"])
        if "data-column" in a:
            if self._in_body:
                self.rows[-1][a["data-column"]] = a["data-value"]
            else:
                self.values[a["data-column"]] = a["data-value"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_board = self._in_body = False


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def same_value(page_value: str, csv_value: str) -> bool:
    """Equal as numbers when both are numbers, else equal as text (empty = undefined)."""
    try:
        return float(page_value) == float(csv_value)
    except ValueError:
        return page_value == csv_value


def html_files(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def board_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.glob("*.html") if p.name != "index.html")


def row_pages_of(board_page: Path) -> list[Path]:
    return sorted((board_page.parent / board_page.stem).glob("*.html"))


def assert_site_matches_csvs(site: Path, csv_dir: Path) -> int:
    """Every number on the board pages and row pages equals the board CSV's; returns the
    number of values compared."""
    compared = 0
    boards = board_pages(site)
    assert boards, f"no board pages in {site}"
    for page_path in boards:
        rows = read_csv(csv_dir / f"{page_path.stem}.csv")
        page = Page(page_path)
        assert len(page.rows) == len(rows), page_path
        for page_row, csv_row in zip(page.rows, rows, strict=True):
            shared = set(page_row) & set(csv_row)
            assert {"rank", "defense", "params", "accuracy"} <= shared
            for column in sorted(shared):
                assert same_value(page_row[column], csv_row[column]), (page_path, column)
                compared += 1
        by_rank = {(r["defense"], r["params"]): r for r in rows}
        for row_path in row_pages_of(page_path):
            values = Page(row_path).values
            csv_row = by_rank[(values["defense"], values["params"])]
            for column in sorted(set(values) & set(csv_row)):
                assert same_value(values[column], csv_row[column]), (row_path, column)
                compared += 1
    return compared


# ---------------------------------------------------------------------------- files


def test_the_site_has_index_boards_rows_data_and_static_files(site):
    assert (site / "index.html").is_file()
    assert sorted(p.name for p in board_pages(site)) == ["digits-l2.html", "digits-linf.html"]
    for board in board_pages(site):
        assert len(row_pages_of(board)) == len(ROWS)
        assert (site / "data" / f"{board.stem}.csv").is_file()
    assert (site / "data" / "results.csv").is_file()
    assert (site / "static" / "site.js").is_file() and (site / "static" / "site.css").is_file()


def test_the_site_matches_the_published_csvs_number_for_number(site, store, tmp_path):
    from bench.leaderboard import publish

    publish(store, tmp_path)  # the CSVs as `certbench leaderboard publish` writes them
    for name in ("digits-l2.csv", "digits-linf.csv", "results.csv"):
        assert (site / "data" / name).read_bytes() == (tmp_path / name).read_bytes()
    # every metric column, rank/defense/model/params and the tail columns of the row pages
    assert assert_site_matches_csvs(site, tmp_path) > 200


def test_links_are_relative_and_resolve_to_generated_files(site):
    for path in html_files(site):
        page = Page(path)
        assert page.links, path
        for href, cls in page.links:
            parsed = urlparse(href)
            if parsed.scheme in ("http", "https"):
                assert "paper" in cls, f"{path}: only citations may link outside: {href}"
                continue
            if parsed.scheme == "data":  # the empty favicon, so no request is made
                continue
            assert not parsed.scheme and not href.startswith("/"), f"{path}: {href}"
            target = (path.parent / unquote(parsed.path)).resolve() if parsed.path else path
            assert target.is_file(), f"{path}: {href} -> {target}"


def test_pages_are_accessible_basics(site):
    for path in html_files(site):
        text = path.read_text(encoding="utf-8")
        page = Page(path)
        assert len(page.ids) == len(set(page.ids)), f"{path}: duplicate ids"
        assert '<html lang="en">' in text and "<th scope=" in text
        assert "<script>alert(1)" not in text and "<b>Madry</b>" not in text  # escaped
        for svg in page.svgs:
            assert svg.get("role") == "img" and svg.get("aria-labelledby"), path
        assert page.svg_titles >= len(page.svgs)
    board = (site / "digits-l2.html").read_text(encoding="utf-8")
    assert board.count('<button type="button" data-sort=') >= 10
    assert 'aria-sort="ascending"' in board
    assert "&lt;b&gt;Madry&lt;/b&gt;" in board


def test_board_page_shows_the_interval_and_the_curves(site):
    page = Page(site / "digits-l2.html")
    smoothing = next(r for r in page.rows if r["params"] == '{"sigma":0.25}')
    # derived interval at the headline eps 0.25: certified at r >= 0.25, attacked at 0.25
    assert float(smoothing["robust_accuracy_lower"]) == pytest.approx(0.745)
    assert float(smoothing["robust_accuracy_upper"]) == pytest.approx(0.795)
    undefended = page.rows[0]
    assert undefended["robust_accuracy_lower"] == "" and undefended["defense"] == "undefended"
    text = (site / "digits-l2.html").read_text(encoding="utf-8")
    assert text.count("<svg ") == 4  # interval chart; certified, attack, PixelDP curves
    assert "Where the true robust accuracy lies" in text


def test_row_pages_show_settings_provenance_and_citation(site):
    pages = {p.name.split("-cnn-")[0]: p for p in row_pages_of(site / "digits-l2.html")}
    smoothing = [p for n, p in pages.items() if n == "randomized-smoothing"]
    text = smoothing[0].read_text(encoding="utf-8")
    assert "Certified Adversarial Robustness via Randomized Smoothing" in text
    assert "Jeremy Cohen, Elan Rosenfeld, Zico Kolter" in text and "@inproceedings{cohen19" in text
    assert 'class="paper" href="https://arxiv.org/abs/1902.02918"' in text
    assert WEIGHTS in text and "abc123" in text and "2.13.0+cpu" in text
    assert "epochs" in text and "pgd" in text  # training and attack settings
    assert "<svg " in text
    undefended = pages["undefended"].read_text(encoding="utf-8")
    assert "No citation declared" in undefended
    plugin = pages["my-plugin"].read_text(encoding="utf-8")
    assert "is not registered where this site was built" in plugin


def test_board_context_uses_intervals_and_headline_values_when_the_board_has_them(store):
    board = next(b for b in build_boards(store) if b.norm == "l2")
    board.headline_eps = 0.5
    row = board.rows[0]
    row.intervals = {"accuracy": (0.8, 0.99, 20), "robust_accuracy_upper": (0.3, 0.7, 20)}
    row.values["robust_accuracy_lower"] = None
    row.values["robust_accuracy_upper"] = 0.5
    ctx = board_context(board, store.cells())
    cells = {c.column: c for c in ctx["pages"][0].cells}
    assert (
        cells["accuracy"].ci == "0.800–0.990" and "20 test examples" in cells["accuracy"].ci_title
    )
    assert cells["robust_accuracy_upper"].value == "0.5"
    assert cells["robust_accuracy_upper"].ci == "0.300–0.700"
    assert cells["robust_accuracy_lower"].text == "none"
    assert any(
        g.label == "robust accuracy at ℓ2 ε = 0.5" for g in ctx["layout"] if hasattr(g, "columns")
    )
    row_ctx = row_context(board, ctx["pages"][0], fake_lookup)
    assert row_ctx["interval"]["upper"].ci == "0.300–0.700"


def test_rebuilding_is_byte_identical_and_removes_only_its_own_stale_files(store, tmp_path):
    out = tmp_path / "site"
    build_site(store, out, defense_class=fake_lookup)
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "mine.txt").write_text("not the site's")
    build_site(store, out, defense_class=fake_lookup)
    second = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "mine.txt"}
    assert first == second
    # a smaller store: the pages of rows that left the board go, other files stay
    small = Store(tmp_path / "small.sqlite")
    _put(small, "undefended", {}, None, 0, "l2", {"accuracy": 0.9})
    build_site(small, out, defense_class=fake_lookup)
    assert (out / "mine.txt").is_file()
    assert not (out / "digits-linf.html").exists() and not (out / "digits-linf").exists()
    assert len(row_pages_of(out / "digits-l2.html")) == 1
    assert not (out / "data" / "digits-linf.csv").exists()


def test_cli_site_prints_the_index_and_errors_in_one_line(capsys, store, tmp_path):
    rc = main(["leaderboard", "site", "--store", str(store.path), "--out", str(tmp_path / "s")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == str((tmp_path / "s" / "index.html").resolve())
    rc = main(["leaderboard", "site", "--store", str(tmp_path / "none.sqlite"), "--out", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("certbench: error: ") and len(err.strip().splitlines()) == 1
    empty = Store(tmp_path / "empty.sqlite")
    rc = main(["leaderboard", "site", "--store", str(empty.path), "--out", str(tmp_path / "e")])
    assert rc == 2 and "no finished cells" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_the_committed_site_matches_the_committed_csvs(name):
    site, csv_dir = ROOT / "leaderboards" / "site" / name, COMMITTED[name]
    if not (site / "index.html").is_file():
        pytest.skip(f"{site} not generated yet (certbench leaderboard site --out {site})")
    assert assert_site_matches_csvs(site, csv_dir) > 0
    # the site's own copy of the data, too
    for csv_name in [f"{board.stem}.csv" for board in board_pages(site)] + ["results.csv"]:
        assert (site / "data" / csv_name).read_bytes() == (csv_dir / csv_name).read_bytes()


# ---------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="certbench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        # no background connections: a closed network refuses them and logs errors
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,1000",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(driver, path: Path) -> list[dict]:
    """Load ``path`` from file:// and return its console errors (after draining old ones)."""
    driver.get_log("browser")
    driver.get(path.resolve().as_uri())
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _screenshot(driver, name: str, *, height: int | None = None) -> None:
    """Save ``ARTIFACTS/<name>.png``: the whole page, or its top ``height`` pixels."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if height is None:
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1400, min(height + 40, 6000))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def _row_order(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "table#board tbody tr")
    return [r.get_attribute("data-row") for r in rows]


def _expected(values: list[str], order: str) -> list[int]:
    """Indices sorted as the page promises: by value (numeric), empty last, ties stable."""
    filled = [i for i, v in enumerate(values) if v != ""]
    sign = -1 if order == "descending" else 1
    filled.sort(key=lambda i: (sign * float(values[i]), i))
    return filled + [i for i, v in enumerate(values) if v == ""]


def _expected_text(values: list[str], order: str) -> list[int]:
    filled = sorted((i for i, v in enumerate(values) if v != ""), key=lambda i: values[i])
    if order == "descending":  # stable: equal texts keep the board's order
        groups: dict[str, list[int]] = {}
        for i in filled:
            groups.setdefault(values[i], []).append(i)
        filled = [i for v in sorted(groups, reverse=True) for i in groups[v]]
    return filled + [i for i, v in enumerate(values) if v == ""]


@pytest.mark.browser
def test_every_page_loads_without_console_errors(browser, site):
    shot = {"index": site / "index.html", "board": site / "digits-l2.html"}
    shot["row"] = next(p for p in row_pages_of(site / "digits-l2.html") if "smoothing" in p.name)
    for path in html_files(site):
        errors = _open(browser, path)
        assert not errors, f"{path}: {errors}"
        assert browser.execute_script("return document.documentElement.classList.contains('js')")
    for name, path in shot.items():
        _open(browser, path)
        _screenshot(browser, f"site-{name}")
        assert (ARTIFACTS / f"site-{name}.png").stat().st_size > 10_000


@pytest.mark.browser
def test_every_link_resolves_to_a_generated_file(browser, site):
    from selenium.webdriver.common.by import By

    for path in html_files(site):
        _open(browser, path)
        for link in browser.find_elements(By.CSS_SELECTOR, "a[href]"):
            url = urlparse(link.get_attribute("href"))  # resolved by the browser
            if url.scheme in ("http", "https"):
                assert "paper" in (link.get_attribute("class") or ""), (path, url)
                continue
            assert url.scheme == "file", (path, url)
            assert Path(unquote(url.path)).is_file(), (path, url)


@pytest.mark.browser
def test_board_table_rows_sorting_filter_and_columns(browser, site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    board = site / "digits-l2.html"
    rows = read_csv(site / "data" / "digits-l2.csv")
    page = Page(board)
    assert not _open(browser, board)
    initial = _row_order(browser)
    assert len(initial) == len(rows) == len(ROWS)  # one table row per board row
    assert [r["defense"] for r in page.rows] == [r["defense"] for r in rows]

    buttons = browser.find_elements(By.CSS_SELECTOR, "table#board thead button[data-sort]")
    checked = 0
    for button in buttons:
        key = button.get_attribute("data-sort")
        numeric = button.get_attribute("data-type") == "number"
        first = button.get_attribute("data-first")
        # values from the CSV where the board has the column, else the page's own
        values = [r[key] for r in rows] if key in rows[0] else [r[key] for r in page.rows]
        th = button.find_element(By.XPATH, "./ancestor::th")
        if not button.is_displayed():  # robust precision and coverage: shown on request
            browser.find_element(By.CSS_SELECTOR, "input[data-toggle]").click()
            assert button.is_displayed()
        other = "ascending" if first == "descending" else "descending"
        # a click on the column the table is sorted by (rank, at first) reverses it
        orders = (other, first) if th.get_attribute("aria-sort") == first else (first, other)
        for order in orders:
            button.click()
            assert th.get_attribute("aria-sort") == order
            want = (_expected if numeric else _expected_text)(values, order)
            assert _row_order(browser) == [initial[i] for i in want], (key, order)
            checked += 1
    assert checked >= 2 * 10

    # sorting is keyboard operable: focus a header button and press Enter / Space
    rank = browser.find_element(By.CSS_SELECTOR, "button[data-sort='rank']")
    accuracy = browser.find_element(By.CSS_SELECTOR, "button[data-sort='accuracy']")
    accuracy.send_keys(Keys.ENTER)
    values = [r["accuracy"] for r in rows]
    assert _row_order(browser) == [initial[i] for i in _expected(values, "descending")]
    rank.send_keys(Keys.SPACE)
    assert _row_order(browser) == initial

    # the filter hides rows that do not match every word typed
    box = browser.find_element(By.ID, "filter")
    box.send_keys("smoothing")
    shown = [r for r in browser.find_elements(By.CSS_SELECTOR, "table#board tbody tr")
             if r.is_displayed()]  # fmt: skip
    assert len(shown) == sum(r["defense"] == "randomized-smoothing" for r in rows) == 2
    box.send_keys(" sigma=0.5")
    shown = [r for r in browser.find_elements(By.CSS_SELECTOR, "table#board tbody tr")
             if r.is_displayed()]  # fmt: skip
    assert len(shown) == 1
    assert "1 of 6 rows" in browser.find_element(By.ID, "status").text
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    assert all(r.is_displayed() for r in browser.find_elements(By.CSS_SELECTOR, "tbody tr"))


@pytest.mark.browser
def test_the_committed_digits_site_in_the_browser(browser):
    site = ROOT / "leaderboards" / "site" / "digits"
    if not (site / "index.html").is_file():
        pytest.skip(f"{site} not generated yet")
    for path in html_files(site):
        assert not _open(browser, path), path
    for board in board_pages(site):  # the README's screenshot is the l2 board's
        _open(browser, board)
        _screenshot(browser, f"committed-{board.stem}", height=1200)
