"""The steering page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python package; no
browser download): it loads, the class slider changes the images, the hook style and layer selectors reach the
request, a click fills the attribution panel, and nothing is fetched from outside the server."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from helpers import start_server, stop_server
from models.steering.hooks import DEFAULT_HOOK_STYLE, HOOK_STYLES

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium() -> Path:
    assert CHROMIUM.is_file() or shutil.which("chromium"), (
        "Debian's chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)")
    return CHROMIUM if CHROMIUM.is_file() else Path(shutil.which("chromium"))


def test_page_steers_and_attributes_in_a_real_browser(chromium, tiny_pipeline, tmp_path, repo_root):
    from playwright.sync_api import sync_playwright
    args = ["--teacher", tiny_pipeline.teacher, "--student", tiny_pipeline.student, "--features",
            tiny_pipeline.features, "--workdir", tmp_path / "work", "--cpu"]
    proc, url = start_server(args, tmp_path / "serve.log", repo_root)
    outside = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("request", lambda r: None if r.url.startswith((url, "data:")) else outside.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#grid img", timeout=30000)
            assert page.locator("#grid img").count() == 16
            assert page.locator("#picker img").count() > 0
            before = page.locator("#grid img").evaluate_all("imgs => imgs.map(i => i.src)")
            page.select_option("#class-label", "0")
            page.locator("#class-strength").evaluate("s => { s.value = '1'; s.dispatchEvent(new Event('input')); }")
            page.wait_for_function("before => [...document.querySelectorAll('#grid img')].some((img, i) => "
                                   "img.src !== before[i])", arg=before, timeout=30000)
            after = page.locator("#grid img").evaluate_all("imgs => imgs.map(i => i.src)")
            assert sum(a != b for a, b in zip(before, after)) > 0
            assert page.locator("#class-strength-value").inner_text() == "1.00"
            styles = page.locator("#hook-style option").evaluate_all("options => options.map(o => o.value)")
            assert styles == list(HOOK_STYLES) and page.locator("#hook-style").input_value() == DEFAULT_HOOK_STYLE
            with page.expect_request(lambda r: r.url.endswith("/v1/generate") and '"style":"mean"' in
                                     (r.post_data or "")):
                page.select_option("#hook-style", "mean")
            for select in ("#class-layer", "#picks-layer"):
                layers = page.locator(f"{select} option").evaluate_all("options => options.map(o => o.value)")
                assert layers == ["bottleneck", "up1", "up2"] and page.locator(select).input_value() == "bottleneck"
            assert page.locator("#class-layer option").all_inner_texts() == ["bottleneck (7x7)", "up1 (14x14)",
                                                                             "up2 (28x28)"]
            shown = page.locator("#grid img").evaluate_all("imgs => imgs.map(i => i.src)")
            with page.expect_request(lambda r: r.url.endswith("/v1/generate") and '"layer":"up1"' in
                                     (r.post_data or "")):
                page.select_option("#class-layer", "up1")
            page.wait_for_function("before => [...document.querySelectorAll('#grid img')].some((img, i) => "
                                   "img.src !== before[i])", arg=shown, timeout=30000)
            page.locator("#grid img").nth(2).click()
            page.wait_for_selector("#attribution .attribution-item img", timeout=30000)
            captions = page.locator("#attribution figcaption").all_inner_texts()
            assert len(captions) == 5 and all(re.fullmatch(r"#\d+ y=0 -?\d\.\d{3} p\d+", c) for c in captions), captions
            page.wait_for_function("[...document.querySelectorAll('#attribution img')].every(i => i.naturalWidth "
                                   "=== 28)", timeout=30000)
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            browser.close()
        assert (tmp_path / "serve_page.png").stat().st_size > 5000
        assert errors == [] and outside == [], (errors, outside)
    finally:
        stop_server(proc)
