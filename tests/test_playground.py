"""The steering playground (server/static/) in a real browser: Debian's headless Chromium,
driven by Selenium, against a live server with the tiny model. The page must load with no
console errors, stream a chat, compare a steered and an unsteered answer side by side, show
the server's own error messages, and build requests that work when copied as curl or Python.

Screenshots go to pytest's temporary directory (or $STEERSERVE_TEST_ARTIFACTS); with
STEERSERVE_UPDATE_SCREENSHOT=1 the README's docs/playground.png is made again, with SmolLM2.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

if importlib.util.find_spec("selenium") is not None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAIRS = {"positive": ["I am happy and full of joy", "What a bright, wonderful day"],
         "negative": ["I am sad and full of gloom", "What a dark, miserable day"]}
WAIT = 60  # seconds: a loaded CI machine streams slowly


def browser_missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -e '.[test]'"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return (f"{path} is missing: apt-get install chromium chromium-driver "
                    "(`make test` installs them when run as root)")
    return None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    chosen = os.environ.get("STEERSERVE_TEST_ARTIFACTS")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("playground-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tokenizer) -> Path:
    """--adapter-dir with one PEFT adapter, for the page's load/unload controls."""
    root = tmp_path_factory.mktemp("playground-adapters")
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
        root / "adapter")
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_root):
    """The admin routes are on, so the page offers extraction and adapter loading; one vector
    is registered up front."""
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32", "--allow-runtime-vectors", "--allow-runtime-lora",
                       "--adapter-dir", str(adapter_root)], api_key=API_KEY)
    made = httpx.post(f"{live.base_url}/v1/steering/vectors", headers=live.headers(),
                      timeout=60, json={"name": "happy", "model": "tiny",
                                        "method": "mean_diff", **PAIRS})
    assert made.status_code == 200, made.text
    yield live
    live.stop()


def start_browser(width: int = 1440, height: int = 1000):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console + network
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def browser():
    reason = browser_missing()
    if reason:
        pytest.skip(f"no browser for the playground tests: {reason}")
    driver = start_browser()
    yield driver
    driver.quit()


def severe(driver) -> list[str]:
    """Console errors, uncaught exceptions and failed loads since the last call."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"]


def open_page(driver, base_url: str, key: str | None = API_KEY) -> None:
    """A fresh page with `key` in its key field's storage (as if typed before). The storage is
    set from a file of the same origin that runs no script, so no call goes out keyless."""
    driver.get(f"{base_url}/static/favicon.svg")
    driver.execute_script("localStorage.clear()")
    if key:
        driver.execute_script("localStorage.setItem('steerserve.apiKey', arguments[0])", key)
    driver.get(f"{base_url}/")


@pytest.fixture
def page(browser, server):
    open_page(browser, server.base_url)
    wait_for(browser, lambda d: "connected" in d.find_element(By.ID, "connection").text)
    severe(browser)  # only what this test does counts
    return browser


def wait_for(driver, condition, timeout: float = WAIT):
    return WebDriverWait(driver, timeout).until(condition)


def by_id(driver, name: str):
    return driver.find_element(By.ID, name)


def fill(driver, name: str, text: str) -> None:
    field = by_id(driver, name)
    field.clear()
    field.send_keys(text)


def choose(driver, name: str, value: str) -> None:
    Select(by_id(driver, name)).select_by_value(value)


def check(driver, name: str, on: bool = True) -> None:
    box = by_id(driver, name)
    if box.is_selected() != on:
        box.click()


def steer(driver, vector: str, scale: str) -> None:
    check(driver, "steer-on")
    choose(driver, "steer-vector", vector)
    fill(driver, "steer-scale-value", scale)


def greedy(driver, max_tokens: int = 16) -> None:
    fill(driver, "temperature", "0")
    fill(driver, "max-tokens", str(max_tokens))


def answers(driver, count: int = 1) -> list[dict]:
    """Waits until `count` assistant messages have finished streaming; returns them all."""
    def finished(d):
        found = d.find_elements(By.CSS_SELECTOR, ".message.assistant")
        states = [m.get_attribute("data-state") for m in found]
        return found if len(found) >= count and "streaming" not in states else False

    return [{"column": m.find_element(By.XPATH, "ancestor::div[@data-role]")
             .get_attribute("data-role"), "state": m.get_attribute("data-state"),
             "text": m.find_element(By.CSS_SELECTOR, ".content").text,
             "chunks": int(m.get_attribute("data-chunks") or 0), "element": m}
            for m in wait_for(driver, finished)]


def send(driver, prompt: str) -> None:
    fill(driver, "prompt", prompt)
    by_id(driver, "send").click()


def request_body(driver) -> dict:
    """The body in the code panel's curl command."""
    command = by_id(driver, "code").text
    return json.loads(command.split("-d '", 1)[1].rsplit("'", 1)[0].replace("'\\''", "'"))


def test_page_loads_without_console_errors_or_outside_resources(browser, server):
    open_page(browser, server.base_url)
    wait_for(browser, lambda d: "connected · tiny" in d.find_element(By.ID, "connection").text)
    wait_for(browser, lambda d: "tok/s" in d.find_element(By.ID, "status-metrics").text)
    assert severe(browser) == []
    models = [o.get_attribute("value") for o in Select(by_id(browser, "model")).options]
    assert models == ["tiny"]
    vectors = [o.get_attribute("value") for o in Select(by_id(browser, "steer-vector")).options]
    assert vectors == ["happy"]
    methods = {o.get_attribute("value") for o in Select(by_id(browser, "decoding-method")).options}
    assert {"proxy_tuning", "contrastive", "sh2", "dola", "logit_arithmetic"} <= methods
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.base_url) for url in loaded), loaded
    assert "happy" in by_id(browser, "status-vectors").text


def test_the_page_needs_no_key_but_its_api_calls_do(browser, server):
    open_page(browser, server.base_url, key=None)
    wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "invalid or missing API key" in by_id(browser, "error-text").text
    assert by_id(browser, "connection").text == "API key needed"
    fill(browser, "api-key", API_KEY)
    by_id(browser, "save-key").click()
    wait_for(browser, lambda d: "connected" in d.find_element(By.ID, "connection").text)
    assert not by_id(browser, "error").is_displayed()
    assert browser.execute_script("return localStorage.getItem('steerserve.apiKey')") == API_KEY


def test_a_chat_streams_into_the_page(page):
    greedy(page, max_tokens=24)
    send(page, "Once upon a time")
    [answer] = answers(page)
    assert answer["state"] == "done" and answer["text"].strip()
    assert answer["chunks"] > 3  # streamed: the text arrived over many events
    assert re.match(r"\d+ tokens · ", answer["element"].find_element(By.CSS_SELECTOR,
                                                                       ".meta").text)
    send(page, "And then?")  # the second turn carries the first in its history
    assert [a["state"] for a in answers(page, 2)] == ["done", "done"]
    assert len(request_body(page)["messages"]) == 5
    assert severe(page) == []


def test_steered_and_unsteered_answers_side_by_side(page, artifacts):
    check(page, "compare")
    greedy(page)
    steer(page, "happy", "8")
    choose(page, "overlay", "probability")
    send(page, "Once upon a time")
    plain, steered = answers(page, 2)
    assert (plain["column"], steered["column"]) == ("plain", "steered")
    assert plain["state"] == steered["state"] == "done"
    assert plain["text"] and steered["text"] and plain["text"] != steered["text"]
    tokens = steered["element"].find_elements(By.CSS_SELECTOR, ".tok")
    assert tokens and "p = " in tokens[0].get_attribute("title")
    assert tokens[0].value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)")
    page.save_screenshot(str(artifacts / "playground-compare.png"))
    assert (artifacts / "playground-compare.png").stat().st_size > 10_000
    assert severe(page) == []


def test_an_invalid_scale_shows_the_servers_error(page):
    steer(page, "happy", "1e9")
    send(page, "Hello")
    [answer] = answers(page)
    assert answer["state"] == "error"
    message = "steering.0.scale: Input should be less than or equal to 10000"
    assert message in by_id(page, "error-text").text
    assert message in answer["element"].find_element(By.CSS_SELECTOR, ".failure").text


@pytest.mark.parametrize("method", ["proxy_tuning", "contrastive", "sh2", "dola",
                                    "logit_arithmetic"])
def test_each_decoding_method_runs_from_its_form(page, method):
    greedy(page, max_tokens=6)
    choose(page, "decoding-method", method)
    assert request_body(page)["decoding"]["method"] == method
    send(page, "Hello")
    [answer] = answers(page)
    assert answer["state"] == "done", answer["text"]
    assert severe(page) == []


def test_adaptive_temperature_shows_each_tokens_temperature(page):
    choose(page, "temp-method", "edt")
    fill(page, "temperature", "0.9")
    fill(page, "seed", "1")  # unseeded, the tiny model's 420 tokens can end the answer at once
    page.find_element(By.CSS_SELECTOR, "#temp-fields input[name=theta]").send_keys("2")
    choose(page, "overlay", "temperature")
    body = request_body(page)
    assert body["adaptive_temperature"] == {"method": "edt", "theta": 2}
    assert body["return_temperatures"] is True
    send(page, "Hello")
    [answer] = answers(page)
    titles = [t.get_attribute("title") for t in
              answer["element"].find_elements(By.CSS_SELECTOR, ".tok")]
    assert titles and all("T = " in title for title in titles)


def test_a_vector_extracted_from_pairs_typed_into_the_page(page):
    by_id(page, "extract").find_element(By.TAG_NAME, "summary").click()
    fill(page, "extract-name", "typed")
    choose(page, "extract-method", "mean_diff")
    fill(page, "extract-layers", "0-1")
    by_id(page, "extract-button").click()
    wait_for(page, lambda d: "layers 0, 1" in d.find_element(By.ID, "extract-status").text)
    assert Select(by_id(page, "steer-vector")).first_selected_option.get_attribute(
        "value") == "typed"
    assert by_id(page, "steer-on").is_selected()
    assert "typed" in by_id(page, "status-vectors").text
    assert request_body(page)["steering"] == [{"vector": "typed", "scale": 1}]


def test_adapters_load_and_unload_from_the_status_panel(page):
    fill(page, "adapter-name", "lora")
    fill(page, "adapter-path", "adapter")
    by_id(page, "adapter-load").find_element(By.TAG_NAME, "button").click()
    wait_for(page, lambda d: "lora" in d.find_element(By.ID, "status-adapters").text)
    choose(page, "model", "lora")
    send(page, "Hello")
    assert answers(page)[0]["state"] == "done"
    by_id(page, "status-adapters").find_element(By.TAG_NAME, "button").click()
    wait_for(page, lambda d: "lora" not in d.find_element(By.ID, "status-adapters").text)
    assert [o.get_attribute("value") for o in Select(by_id(page, "model")).options] == ["tiny"]


def test_the_request_shown_as_curl_and_python_runs(page, server):
    steer(page, "happy", "2")
    fill(page, "max-tokens", "5")
    fill(page, "prompt", "It's a test")  # a quote the shell command must survive
    env = {**os.environ, "STEERSERVE_API_KEY": API_KEY}
    if shutil.which("curl"):
        shown = subprocess.run(["sh", "-c", by_id(page, "code").text], capture_output=True,
                               text=True, timeout=60, env=env)
        assert shown.returncode == 0 and "[DONE]" in shown.stdout, shown.stderr
    assert request_body(page)["steering"] == [{"vector": "happy", "scale": 2}]
    page.find_element(By.CSS_SELECTOR, ".tab[data-tab=python]").click()
    code = by_id(page, "code").text
    assert "extra_body=" in code and '"steering"' in code
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert ran.returncode == 0, ran.stderr


@pytest.mark.slow
def test_a_json_schema_typed_into_the_page_shapes_the_answer(page):
    schema = {"type": "object", "properties": {"mood": {"enum": ["calm", "glad"]}},
              "required": ["mood"], "additionalProperties": False}
    greedy(page, max_tokens=40)
    fill(page, "json-schema", json.dumps(schema))
    send(page, "How are you?")
    [answer] = answers(page)
    assert answer["state"] == "done" and json.loads(answer["text"])["mood"] in ("calm", "glad")
    assert request_body(page)["response_format"]["json_schema"]["schema"] == schema
    fill(page, "json-schema", "{not json")  # sent as typed: the server names the field
    send(page, "Again?")  # the reply comes back after the click: wait for it
    wait_for(page, lambda d: "response_format.json_schema.schema" in by_id(d, "error-text").text)


def test_tools_typed_into_the_page_show_the_call(page):
    tool = {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                               "maximum": 9}},
        "required": ["n"], "additionalProperties": False}}}
    greedy(page, max_tokens=60)
    fill(page, "tools", json.dumps([tool]))
    choose(page, "tool-choice", "required")
    send(page, "Ping the server.")
    [answer] = answers(page)
    [call] = answer["element"].find_elements(By.CSS_SELECTOR, ".tool-call")
    assert re.fullmatch(r'→ ping\(\{"n": [0-9]\}\)', call.text), call.text
    assert severe(page) == []


def test_readme_screenshot_with_smollm2(browser, artifacts):
    """docs/playground.png: the embedded model, a joyful vector extracted on the page from
    the shipped pairs, and the same question without and with it."""
    if not os.environ.get("STEERSERVE_UPDATE_SCREENSHOT"):
        pytest.skip("set STEERSERVE_UPDATE_SCREENSHOT=1 to make docs/playground.png again")
    pairs = json.loads((REPO / "examples/steering/joyful_gloomy.json").read_text())["pairs"]
    live = LiveServer(["--model", "SmolLM2-135M-Instruct", "--dtype", "float32",
                       "--max-model-len", "1024", "--allow-runtime-vectors"], api_key=API_KEY)
    try:
        open_page(browser, live.base_url)
        wait_for(browser, lambda d: "connected" in d.find_element(By.ID, "connection").text)
        by_id(browser, "extract").find_element(By.TAG_NAME, "summary").click()
        fill(browser, "extract-name", "joyful")
        choose(browser, "extract-method", "mean_diff")
        fill(browser, "extract-layers", "10-15")
        for side in ("positive", "negative"):
            browser.execute_script("arguments[0].value = arguments[1]",
                                   by_id(browser, f"extract-{side}"),
                                   "\n".join(p[side] for p in pairs))
        by_id(browser, "extract-button").click()
        wait_for(browser, lambda d: "layers 10" in d.find_element(By.ID, "extract-status").text,
                 timeout=600)
        check(browser, "compare")
        greedy(browser, max_tokens=48)
        steer(browser, "joyful", "0.4")
        choose(browser, "overlay", "probability")
        send(browser, "Describe the weather today.")
        plain, steered = answers(browser, 2)
        assert plain["text"] != steered["text"]
        browser.execute_script("window.scrollTo(0, 0)")
        shot = artifacts / "playground-smollm2.png"
        browser.save_screenshot(str(shot))
        shutil.copy(shot, REPO / "docs" / "playground.png")
    finally:
        live.stop()
