"""Dashboards as a user sees them: headless Chromium (the system's, via Selenium) opens the sites
from file:// with no network and no server. No console error; one table row per latent; sorting
and filtering change the rows; a click opens the latent's heatmap (modular) or sequence windows
(protein); a shared #latent=N link opens that panel; the numbers on screen match a brute-force
computation. Screenshots stay in the test's temp dir. `make test-browser` installs the browser."""
import os
import shutil

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from sae.analysis.runs import load_sae_run, train_or_reuse
from sae.dashboard.browser import console_errors, find_chromium, headless_chromium
from sae.dashboard.build import build_run_dashboard
from sae.dashboard.sweep import build_sweep_dashboard
from sae.jobs import run_training
from tests.conftest import tiny_protein_config
from tests.unit.test_dashboard import TINY, all_pairs, site_data

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def driver():
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium + chromedriver: `make test-browser` installs them (as root)")
        pytest.skip("no chromium + chromedriver on PATH: run `make browser` (as root)")
    with headless_chromium(width=1400, height=1200) as browser:
        yield browser


@pytest.fixture(scope="module")
def modular(tmp_path_factory, host_cache):
    root = tmp_path_factory.mktemp("browser_modular")
    run = train_or_reuse([*TINY, f"host_model.cache_dir={host_cache}"], root / "run")
    return run, build_run_dashboard(run, root / "site")


def wait_for(driver, css: str, timeout: float = 10):
    return WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def table_ids(driver) -> list[int]:
    return [int(row.get_attribute("data-latent")) for row in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")]


def test_the_modular_dashboard_sorts_filters_and_opens_panels_without_errors(driver, modular, tmp_path):
    run_dir, index = modular
    data, _ = site_data(index.parent)
    driver.get(index.as_uri())
    assert table_ids(driver) == list(range(48))  # one row per latent, in id order
    driver.find_element(By.CSS_SELECTOR, '#latents th[data-key="freq_train"]').click()
    frequency = data["values"]["freq_train"]
    shown = table_ids(driver)
    assert [frequency[i] for i in shown] == sorted(frequency, reverse=True) and shown != list(range(48))
    search = driver.find_element(By.ID, "search")
    search.send_keys("3-5")
    assert sorted(table_ids(driver)) == [3, 4, 5]
    search.clear()
    search.send_keys("0")  # clear() sends no input event: type something, then erase it
    search.send_keys("\b")
    assert len(table_ids(driver)) == 48
    alive = max(range(48), key=lambda i: frequency[i])
    driver.find_element(By.CSS_SELECTOR, f'#latents tbody tr[data-latent="{alive}"]').click()
    wait_for(driver, "#panel canvas.map")
    assert driver.current_url.endswith(f"#latent={alive}")
    assert driver.find_element(By.CSS_SELECTOR, "#panel h2").text.startswith(f"Latent {alive}")
    driver.save_screenshot(str(tmp_path / "modular_panel.png"))
    assert (tmp_path / "modular_panel.png").stat().st_size > 10_000
    assert console_errors(driver) == []


def test_a_shared_link_opens_its_panel_with_the_brute_force_top_pairs(driver, modular, tmp_path):
    run_dir, index = modular
    run = load_sae_run(run_dir)
    tokens, _, codes = all_pairs(run)
    latent = int(codes.gt(0).sum(0).argmax())
    driver.get(index.as_uri() + f"#latent={latent}")  # a fresh load, as from a link pasted into a browser
    wait_for(driver, "#panel table.small tr td")
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, "#panel table.small tr") if row.find_elements(By.TAG_NAME, "td")]
    values = codes[:, latent]
    order = values.argsort(descending=True, stable=True)
    assert len(rows) == 12
    for (op, a, b, value, split), index_row in zip(rows, order[:12].tolist()):
        own = values[(tokens[:, 0] == int(a)) & (tokens[:, 2] == int(b))].item()
        assert op == "addition" and float(value) == pytest.approx(own, rel=5e-3)
        assert float(value) == pytest.approx(values[index_row].item(), rel=5e-3)  # the k-th largest, ties aside
    driver.save_screenshot(str(tmp_path / "shared_link.png"))
    driver.get(index.as_uri() + "#latent=9999")
    wait_for(driver, "#panel p.hint")
    assert "not in this dashboard" in driver.find_element(By.CSS_SELECTOR, "#panel p.hint").text
    assert console_errors(driver) == []


def test_the_protein_dashboard_shows_sequence_windows(driver, tmp_path, tiny_esm2_files):
    cfg = tiny_protein_config(tmp_path, tiny_esm2_files, num_steps=30)  # a crosscoder over two tiny ESM-2s
    run_training(cfg, tmp_path / "run")
    index = build_run_dashboard(tmp_path / "run", tmp_path / "site")
    data, panels = site_data(index.parent)
    driver.get(index.as_uri())
    assert table_ids(driver) == data["latents"] == list(range(64))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#histograms figure")) == 2  # firing, relative norm
    latent = next(i for i in data["latents"] if panels[i]["windows"])
    driver.find_element(By.CSS_SELECTOR, f'#latents tbody tr[data-latent="{latent}"]').click()
    windows = wait_for(driver, "#panel .window")
    assert len(windows) == len(panels[latent]["windows"])
    first = panels[latent]["windows"][0]
    assert first["record"] in windows[0].text and f"residue {first['residue']} " in windows[0].text
    centre = windows[0].find_element(By.CSS_SELECTOR, ".res.centre").text
    assert centre == first["letters"][data["panel_meta"]["window"]]
    driver.save_screenshot(str(tmp_path / "protein_panel.png"))
    assert console_errors(driver) == []


def test_a_copied_site_still_opens_and_the_sweep_page_links_work(driver, modular, tmp_path):
    run_dir, index = modular
    copy = tmp_path / "copied"
    shutil.copytree(index.parent, copy)  # e.g. scp'd off the cluster
    driver.get((copy / "index.html").as_uri() + "#latent=1")
    wait_for(driver, "#panel h2")
    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "0_sae.k=4")
    (sweep / "0_sae.k=4" / ".hydra").mkdir(exist_ok=True)
    (sweep / "0_sae.k=4" / ".hydra" / "overrides.yaml").write_text("- sae.k=4\n")
    page = build_sweep_dashboard(sweep)
    driver.get(page.as_uri())
    driver.find_element(By.LINK_TEXT, "open").click()
    wait_for(driver, "#latents tbody tr")
    assert driver.current_url.endswith("0_sae.k=4/dashboard/index.html")
    assert console_errors(driver) == []
