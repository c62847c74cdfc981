"""`vis2ir app`: the web page, end to end through gradio_client and a real (headless) browser."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vis2ir.app import App, _events, build_app, load_models, serve
from vis2ir.cli import main
from vis2ir.data.thermalscenes import render_scene

ORIENTATION = 0x0112


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models():
    return load_models()


@pytest.fixture(scope="module")
def served():
    """The page with the shipped models on 127.0.0.1 at a free port, in the background; stopped afterwards."""
    port = free_port()
    page = serve(host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture
def phone_photo(tmp_path):
    """A landscape scene (80×48 upright) stored sideways in a JPEG with EXIF orientation 6, as phones
    write them, and its semantic map upright; returns (photo, map)."""
    scene = render_scene(7, size=(48, 80))  # a day scene with people
    photo, semantic = tmp_path / "phone.jpg", tmp_path / "phone_map.png"
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90° clockwise to view": the pixels are stored turned left
    Image.fromarray(scene.visible).transpose(Image.Transpose.ROTATE_90).save(photo, quality=95, exif=exif)
    Image.fromarray(scene.semantic).save(semantic)
    assert Image.open(photo).size == (48, 80)
    return photo, semantic


def test_a_photo_through_the_served_page(served, phone_photo, tmp_path):
    """gradio_client sends a photo and its map to the running server and gets a 16-bit PNG of the photo's
    upright size back; a file that is not an image gets the command line's one-line error."""
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    photo, semantic = phone_photo
    out = client.predict("demo (channel_concat)", handle_file(str(photo)), handle_file(str(semantic)), "white-hot",
                         16, 4, 0, api_name="/generate")
    png = Image.open(out[2])
    assert png.size == (80, 48) and png.mode.startswith("I")  # upright (EXIF) and 16-bit
    assert np.asarray(png).std() > 0

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(Exception, match=r"photo notes\.png: cannot read image") as err:
        client.predict("demo (channel_concat)", handle_file(str(bad)), handle_file(str(semantic)), "white-hot", 8, 4,
                       0, api_name="/generate")
    assert "\n" not in str(err.value).strip()


def test_page_functions(models, phone_photo, tmp_path):
    """Progress follows the denoising steps; a cross-attention model's attention is shown from a clicked point,
    in a panel the page shows only for a model with an attention adapter (a new result clears the last maps);
    bad maps and settings are one-line errors naming what is wrong."""
    from vis2ir.errors import Vis2IRError

    app = App(models, tmp_path)
    generate = _events(app, ())[0]  # the page's event: App.generate, then the panel, the maps, the status line
    photo, semantic = (str(p) for p in phone_photo)
    steps = []
    out = generate("demo_cross_attention (cross_attention)", photo, semantic, "ironbow", 8, 3, 0, None,
                   lambda done, desc=None: steps.append(done))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    (before, after), compare, png, clickable, state, note, panel, old_mean, old_heads, status = out
    assert Image.open(png).size == (80, 48) and before.shape == after.shape == clickable.shape
    assert app.kept.get(state).attention is not None and "Click a point" in note
    assert panel["visible"] is True and old_mean is None and old_heads is None
    assert status == "phone.jpg (3 steps, seed 0) → infrared by demo_cross_attention (cross_attention)"
    x, y = clickable.shape[1] / 2, clickable.shape[0] / 2  # in the shown (enlarged) photo's pixels
    mean, heads = app.attention(state, x, y)
    assert Image.open(mean).width >= 256 and Image.open(heads).width > Image.open(mean).width
    w, h = Image.open(heads).size
    assert w < 3 * h  # 8 heads wrapped onto rows of 4: a picture that stays readable when shrunk, not a strip
    out = generate("demo (channel_concat)", photo, semantic, "white-hot", 8, 2, 0, state)
    assert app.kept.get(out[4]).attention is None and "no attention adapter" in out[5]
    assert "demo_cross_attention" in out[5]  # the model that has them
    assert out[6]["visible"] is False  # no panel to click for a model without an adapter
    with pytest.raises(Vis2IRError, match="generate with a cross-attention model first"):
        app.attention(out[4], 1, 1)

    square = tmp_path / "square.png"
    Image.fromarray(render_scene(1, size=64).semantic).save(square)
    with pytest.raises(Vis2IRError, match=r"semantic map square\.png: size mismatch.*photo phone\.jpg"):
        app.generate("demo (channel_concat)", photo, str(square), "white-hot", 8, 2, 0)
    with pytest.raises(Vis2IRError, match="16 works with the grey palettes"):
        app.generate("demo (channel_concat)", photo, semantic, "ironbow", 16, 2, 0)
    with pytest.raises(Vis2IRError, match="no photo"):
        app.generate("demo (channel_concat)", None, semantic, "white-hot", 8, 2, 0)
    app.segment_model = str(tmp_path / "no-segmenter")  # no map and no segmenter weights here: say what to do
    with pytest.raises(Vis2IRError, match="needs a semantic map: upload one"):
        app.generate("demo (channel_concat)", photo, None, "white-hot", 8, 2, 0)


def test_a_dropout_model_runs_without_a_map_or_a_segmenter(phone_photo, tmp_path):
    """A model trained with train.semantic_dropout reads the unknown map: the page generates for a photo without a
    map on a machine without the segmenter, where the same model trained without dropout is refused (above)."""
    from vis2ir.pipeline import Vis2IRPipeline

    pipe = Vis2IRPipeline.from_checkpoint("demo", device="cpu", overrides=["train.semantic_dropout=0.3"])
    app = App({"m": pipe}, tmp_path, segment_model=str(tmp_path / "no-segmenter"))
    out = app.generate("m", str(phone_photo[0]), None, "white-hot", 8, 2, 0)
    assert Image.open(out[2]).size == (80, 48)


def test_app_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["app"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'vis2ir: error: vis2ir app needs gradio, which is not installed: pip install "vis2ir[app]"'


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed here (.ci/run installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def _wait(condition, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError("the page did not show it in time")


def _displayed(browser, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return [e for e in browser.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]


def test_the_page_in_a_browser(served, phone_photo, tmp_path):
    """Headless Chromium: the examples are thumbnails (a click fills the photo and its map); upload a photo and
    its map, press Generate, see the infrared; no attention panel for a model without an adapter; with the
    cross-attention model, click the photo and see the attention, the per-head picture near its own size.
    Screenshots go to $VIS2IR_APP_SCREENSHOTS (docs/pictures) when set."""
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("VIS2IR_APP_SCREENSHOTS", tmp_path))
    browser = _browser()
    try:
        browser.get(served)
        images = lambda: browser.find_elements(By.CSS_SELECTOR, "#result img")  # noqa: E731
        _wait(lambda: len(images()) >= 2)  # the first example's result, on load
        first = images()[1].get_attribute("src")
        assert "no attention adapter" in browser.find_element(By.ID, "note").text
        assert not _displayed(browser, "#clickable")  # the opening model (channel_concat) has no adapter

        thumbs = _wait(lambda: _displayed(browser, "#examples img"))
        assert len(thumbs) == 8 and all(int(t.get_attribute("naturalWidth")) >= 256 for t in thumbs)
        captions = browser.find_elements(By.CSS_SELECTOR, "#examples .caption-label")
        assert [c.text for c in captions][2:4] == ["2: photo", "2: map"]  # whole: short enough not to be cut
        assert not [c.text for c in captions if browser.execute_script(
            "return arguments[0].scrollWidth > arguments[0].clientWidth", c)]  # no caption cut by an ellipsis
        thumbs[3].click()  # the second scene's map: its photo and map fill the inputs
        for elem in ("photo", "semantic"):
            _wait(lambda: "scene_000019" in browser.find_element(By.ID, elem).text)
        photo, semantic = phone_photo
        for elem, path in (("photo", photo), ("semantic", semantic)):
            for clear in browser.find_elements(By.CSS_SELECTOR, f"#{elem} button[aria-label='Clear']"):
                clear.click()
            _wait(lambda: browser.find_elements(By.CSS_SELECTOR, f"#{elem} input[type=file]"))
            browser.find_element(By.CSS_SELECTOR, f"#{elem} input[type=file]").send_keys(str(path))
            _wait(lambda: path.stem in browser.find_element(By.ID, elem).text)
        browser.find_element(By.ID, "generate").click()
        _wait(lambda: len(images()) >= 2 and images()[1].get_attribute("src") != first)
        shown = images()[1]
        assert shown.get_attribute("naturalWidth") == str(80 * 4)  # the 80×48 photo drawn 4× larger
        browser.save_screenshot(str(shots / "app_result.png"))

        model = browser.find_element(By.CSS_SELECTOR, "#model input")
        model.click()
        _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li"))
        [o for o in browser.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li") if "cross" in o.text][0].click()
        browser.find_element(By.ID, "generate").click()
        _wait(lambda: "Click a point" in browser.find_element(By.ID, "note").text)
        target = _wait(lambda: _displayed(browser, "#clickable img"))[0]
        time.sleep(1)
        target.click()
        heads = _wait(lambda: _displayed(browser, "#heads img"))[0]
        browser.execute_script("document.getElementById('clickable').scrollIntoView()")
        time.sleep(1)
        drawn = heads.size
        assert drawn["width"] >= 0.9 * int(heads.get_attribute("naturalWidth"))  # not shrunk into a strip
        assert drawn["width"] < 3 * drawn["height"]
        browser.save_screenshot(str(shots / "app_attention.png"))
    finally:
        browser.quit()
    for name in ("app_result.png", "app_attention.png"):
        assert Image.open(shots / name).size[0] >= 1000


def test_an_error_in_the_page_keeps_the_previous_result(served, tmp_path):
    """A bad upload's one-line error comes as Gradio's notice and in the status line under Generate; the
    result already on the page (slider, compare picture) stays, not covered by an error."""
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser = _browser()
    try:
        browser.get(served)
        images = lambda: browser.find_elements(By.CSS_SELECTOR, "#result img")  # noqa: E731
        _wait(lambda: len(images()) >= 2)  # the opening example's result
        before = [images()[1].get_attribute("src"), browser.find_element(By.CSS_SELECTOR, "#compare img")
                  .get_attribute("src")]
        for clear in browser.find_elements(By.CSS_SELECTOR, "#photo button[aria-label='Clear']"):
            clear.click()
        _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(bad))
        _wait(lambda: "notes" in browser.find_element(By.ID, "photo").text)
        browser.find_element(By.ID, "generate").click()
        _wait(lambda: [t for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
                       if "photo notes.png: cannot read image" in t.text])
        _wait(lambda: "Error" in browser.find_element(By.ID, "status").text)
        for elem in ("result", "compare"):
            assert "Error" not in browser.find_element(By.ID, elem).text, elem
        after = [images()[1].get_attribute("src"), browser.find_element(By.CSS_SELECTOR, "#compare img")
                 .get_attribute("src")]
        assert after == before and all(_displayed(browser, f"#{e} img") for e in ("result", "compare"))
    finally:
        browser.quit()


# -- startup, settings and errors: one line, before the models load -----------------------------------------


@pytest.fixture
def no_models(monkeypatch):
    """Loading the models is a test failure: the checks come first."""
    import vis2ir.app

    monkeypatch.setattr(vis2ir.app, "load_models", lambda *a, **k: pytest.fail("the models were loaded"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vis2ir: error: "), err
    return err


def test_a_port_in_use_is_one_line_before_the_models_load(no_models, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    assert _one_line(capsys) == (f"vis2ir: error: --port {port}: already in use on 127.0.0.1; pick another with "
                                 "--port N")


@pytest.mark.parametrize("port", ["99999", "0", "-5"])
def test_a_port_out_of_range_is_one_line(port, no_models, capsys):
    assert main(["app", "--port", port]) == 2
    assert _one_line(capsys) == f"vis2ir: error: --port {port}: expected a port number from 1 to 65535"


def test_a_host_that_is_not_here_is_one_line(no_models, capsys):
    assert main(["app", "--host", "no-such-host.invalid", "--port", str(free_port())]) == 2
    assert "--host no-such-host.invalid: not an address of this machine" in _one_line(capsys)


def test_a_port_taken_while_the_models_load_is_one_line_and_nothing_says_serving(monkeypatch, capsys, caplog):
    """The bind check passes, then the port is taken before Gradio binds it: launch's OSError is the same line,
    and "Serving" is logged only once the page is up."""
    import logging

    import vis2ir.app

    caplog.set_level(logging.INFO, logger="vis2ir")
    monkeypatch.setattr(vis2ir.app, "check_port", lambda host, port: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    assert _one_line(capsys).endswith(f"--port {port}: already in use on 127.0.0.1; pick another with --port N")
    assert not [r for r in caplog.records if "Serving" in r.getMessage()]


def test_the_page_says_where_it_serves_once_it_is_up(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="vis2ir")
    port = free_port()
    page = serve(host="127.0.0.1", port=port, block=False)
    try:
        served = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Serving")]
        assert served and served[0].endswith(f"on http://127.0.0.1:{port}/")
    finally:
        page.close()


def test_app_takes_the_segment_model(monkeypatch):
    """`vis2ir app --segment-model` (named by the page's error) exists and reaches the page."""
    import vis2ir.app

    seen = {}
    monkeypatch.setattr(vis2ir.app, "serve", lambda *a, **k: seen.update(k))
    assert main(["app", "--segment-model", "my/segmenter"]) == 0
    assert seen["segment_model"] == "my/segmenter"


def test_the_segmenter_loads_on_the_models_device(monkeypatch, tmp_path):
    import types

    import torch

    import vis2ir.segment

    loaded = {}

    class Recorder:
        def __init__(self, model, device, setting):
            loaded.update(model=model, device=device, setting=setting)

    monkeypatch.setattr(vis2ir.segment, "Segmenter", Recorder)
    pipe = types.SimpleNamespace(device=torch.device("cuda", 1), model=types.SimpleNamespace(mode="channel_concat"))
    app = App({"m": pipe}, tmp_path, segment_model=str(tmp_path))  # a local folder: no Hub look-up
    assert isinstance(app.segmenter(pipe), Recorder)
    assert loaded == {"model": str(tmp_path), "device": torch.device("cuda", 1),
                      "setting": "vis2ir app --segment-model"}


@pytest.mark.parametrize("seed", [2**70, -1, 2**32])
def test_page_seeds_are_checked_by_the_settings_validator(seed, models, phone_photo, tmp_path):
    """The page's steps and seed go through the one validator (SampleConfig): a huge seed was torch's
    'Overflow when unpacking long long', a negative one was taken."""
    from vis2ir.errors import Vis2IRError

    photo, semantic = (str(p) for p in phone_photo)
    with pytest.raises(Vis2IRError, match=r"^sample.seed: expected an integer from 0 to 4294967295"):
        App(models, tmp_path).generate("demo (channel_concat)", photo, semantic, "white-hot", 8, 2, seed)
    with pytest.raises(Vis2IRError, match=r"^sample.steps: expected an integer >= 1, got 0$"):
        App(models, tmp_path).generate("demo (channel_concat)", photo, semantic, "white-hot", 8, 0, 0)


def test_a_bad_upload_is_one_line_in_the_server_log_without_a_traceback(served, phone_photo, tmp_path, capfd,
                                                                         caplog):
    import logging

    from gradio_client import Client, handle_file

    caplog.set_level(logging.WARNING, logger="vis2ir")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    client = Client(served, verbose=False)
    with pytest.raises(Exception, match=r"photo notes\.png: cannot read image"):
        client.predict("demo (channel_concat)", handle_file(str(bad)), handle_file(str(phone_photo[1])), "white-hot",
                       8, 2, 0, api_name="/generate")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert [r.getMessage() for r in caplog.records if "notes.png: cannot read image" in r.getMessage()]


# -- a long-running page: the disk stays bounded, the opening example is generated once ----------------------


def _age(folder: Path, seconds: float) -> None:
    """Make `folder` look last modified `seconds` ago (how the sweep decides), without waiting."""
    past = time.time() - seconds
    os.utime(folder, (past, past))


def test_results_are_deleted_after_the_keep_time(models, phone_photo, tmp_path):
    """Every request first deletes the result folders (PNGs, attention pictures) older than the keep time: however
    many requests come, the folder holds only those of the last keep time; the opening example's files stay."""
    app = App(models, tmp_path, keep_s=60)
    photo, semantic = (str(p) for p in phone_photo)
    results = tmp_path / "results"
    model = "demo_cross_attention (cross_attention)"
    for _ in range(3):
        out = app.generate(model, photo, semantic, "white-hot", 16, 1, 0)
        new = Path(out[2]).parent
        assert new.parent == results and list(results.iterdir()) == [new]  # the older ones were deleted
        mean, heads = app.attention(out[4], 1, 1)
        assert {Path(mean).parent, Path(heads).parent} == {Path(mean).parent} != {new}
        assert set(results.iterdir()) == {new, Path(mean).parent}  # `new` is younger than the keep time: kept
        for folder in results.iterdir():
            _age(folder, 61)

    example = app.example((model, photo, semantic, "white-hot", 8, 1, 0))
    _age(Path(example[2]).parent, 10**6)
    fresh = Path(app.generate(model, photo, semantic, "white-hot", 8, 1, 0)[2]).parent
    assert list(results.iterdir()) == [fresh] and Path(example[2]).is_file()  # the example is not a result


def test_gradio_deletes_its_uploads_and_copies_after_the_keep_time(models, tmp_path):
    """Gradio's own files (uploads, its copies of results) are deleted by its `delete_cache` schedule: at the
    keep time, checked every 10 minutes at most."""
    assert build_app(models, tmp_path / "short", keep_s=90).delete_cache == (90, 90)
    assert build_app(models, tmp_path / "long", keep_s=7200).delete_cache == (600, 7200)
    page = serve(host="127.0.0.1", port=free_port(), block=False, keep_minutes=2.5)
    try:
        assert page.delete_cache == (150, 150)
    finally:
        page.close()


def test_gradio_files_are_bounded_in_total_oldest_deleted_first(models, monkeypatch, tmp_path):
    """Uploads under the limit were kept for the whole keep time however many came (six 24 MiB uploads: 165 MiB):
    each upload (Gradio's route adds it to the page's `upload_file_set`) now deletes the oldest of Gradio's files
    for the page beyond `KEEP_FILES` files or `KEEP_FILES_MIB` in all; the new upload and the examples stay."""
    import vis2ir.app

    monkeypatch.setattr(vis2ir.app, "KEEP_FILES_MIB", 2500 / 2**20)  # 2500 bytes
    monkeypatch.setattr(vis2ir.app, "KEEP_FILES", 3)
    page = build_app(models, tmp_path / "work")
    cache = tmp_path / "gradio"
    cache.mkdir()
    paths = []
    for k in range(6):  # what Gradio's upload route does with each upload, in the order they came
        path = cache / f"upload{k}.png"
        path.write_bytes(os.urandom(1000))
        os.utime(path, (1000 + k, 1000 + k))
        page.upload_file_set.update([str(path)])
        paths.append(path)
        assert path.is_file()  # the new upload is kept
    assert [p.is_file() for p in paths] == [False] * 4 + [True] * 2  # 2000 bytes of the newest: 3000 is over
    assert set(page.upload_file_set) == {str(p) for p in paths[4:]}
    examples = [p for group in page.temp_file_sets for p in group if str(cache) not in str(p)]
    assert examples and all(Path(p).is_file() for p in examples)  # the page's examples stay
    big = cache / "big.png"  # an upload larger than the bound alone: kept (it was just made), the others go
    big.write_bytes(os.urandom(4000))
    page.upload_file_set.update([str(big)])
    assert big.is_file() and not any(p.is_file() for p in paths)
    small = []
    for k in range(5):  # at most KEEP_FILES files, however small
        small.append(cache / f"small{k}.png")
        small[-1].write_bytes(b"x")
        os.utime(small[-1], (2000 + k, 2000 + k))
        page.upload_file_set.update([str(small[-1])])
    assert [p.is_file() for p in small] == [False, False, True, True, True] and not big.is_file()


@pytest.mark.parametrize("minutes", ["0", "-5", "nan", "inf", "1e9"])
def test_a_bad_keep_time_is_one_line_before_the_models_load(minutes, no_models, capsys):
    assert main(["app", "--keep-minutes", minutes, "--port", str(free_port())]) == 2
    shown = format(float(minutes), "g")
    assert _one_line(capsys) == (f"vis2ir: error: --keep-minutes {shown}: expected a number of minutes above 0 and "
                                 "at most 525600 (how long results and uploads are kept)")


def test_app_takes_the_keep_time(monkeypatch):
    import vis2ir.app

    seen = {}
    monkeypatch.setattr(vis2ir.app, "serve", lambda *a, **k: seen.update(k))
    assert main(["app"]) == 0 and seen["keep_minutes"] == 60 and seen["max_upload_mib"] == 25
    assert main(["app", "--keep-minutes", "0.5"]) == 0 and seen["keep_minutes"] == 0.5
    assert main(["app", "--max-upload-mib", "2.5"]) == 0 and seen["max_upload_mib"] == 2.5


# -- however many visitors come: uploads limited, results bounded in memory and on disk ----------------------


def test_an_upload_over_the_limit_is_refused_in_one_line_before_it_is_decoded(models, phone_photo, tmp_path,
                                                                                monkeypatch):
    """A photo or a map larger than the upload limit is refused naming it, the limit and the option; the
    image reader never sees it."""
    import vis2ir.app
    from vis2ir.errors import Vis2IRError

    app = App(models, tmp_path, max_upload_bytes=2**20)
    big = tmp_path / "photo.png"
    big.write_bytes(os.urandom(2**20 + 1))  # random bytes named like a photo
    read, real = [], vis2ir.app.read_image
    monkeypatch.setattr(vis2ir.app, "read_image", lambda path, *a, **k: read.append(Path(path)) or real(path, *a, **k))
    for photo, semantic, label in [(big, phone_photo[1], "photo photo.png"),
                                   (phone_photo[0], big, "semantic map photo.png")]:
        with pytest.raises(Vis2IRError, match=rf"^{label}: 1.0 MiB, over the upload limit of 1 MiB "
                                              r"\(vis2ir app --max-upload-mib\); send a smaller file$"):
            app.generate("demo (channel_concat)", str(photo), str(semantic), "white-hot", 8, 1, 0)
    assert read == [phone_photo[0]]  # only the photo of the second call, which is within the limit


@pytest.mark.parametrize("mib", ["0", "-1", "nan", "1e6"])
def test_a_bad_upload_limit_is_one_line_before_the_models_load(mib, no_models, capsys):
    assert main(["app", "--max-upload-mib", mib, "--port", str(free_port())]) == 2
    assert _one_line(capsys) == (f"vis2ir: error: --max-upload-mib {format(float(mib), 'g')}: expected a number of "
                                 "MiB above 0 and at most 4096 (the largest photo or map a visitor may upload)")


def test_the_server_refuses_an_upload_over_the_limit_before_storing_it(models, monkeypatch, tmp_path):
    """Gradio's upload route answers 413 for a file over `--max-upload-mib`: nothing of it reaches the page."""
    import httpx

    import vis2ir.app

    monkeypatch.setattr(vis2ir.app, "load_models", lambda *a, **k: models)
    port = free_port()
    page = serve(host="127.0.0.1", port=port, block=False, max_upload_mib=0.5)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(url, files={"files": ("photo.png", os.urandom(1000))})
        big = httpx.post(url, files={"files": ("photo.png", os.urandom(2**19 + 1))})
    finally:
        page.close()
    assert small.status_code == 200
    assert big.status_code == 413 and "maximum allowed size of 524288 bytes" in big.text


def test_results_in_memory_are_bounded_however_many_visitors_come(models, phone_photo, tmp_path):
    """A visitor's state is a key: its previous result is dropped when it generates again, and all visitors'
    results together are the newest `count` within the byte bound; a dropped one says so in one line. The
    result folders on disk are bounded by the same count."""
    from vis2ir.app import Kept
    from vis2ir.errors import Vis2IRError

    app = App(models, tmp_path, kept=Kept(count=3))
    photo, semantic = (str(p) for p in phone_photo)
    model = "demo_cross_attention (cross_attention)"
    example = app.example((model, photo, semantic, "white-hot", 8, 1, 0))[4]
    mine = None
    for _ in range(3):  # one visitor, three results: only the last is kept
        mine = app.generate(model, photo, semantic, "white-hot", 8, 1, 0, previous=mine)[4]
    assert len(app.kept) == 1 and isinstance(mine, str)
    others = [app.generate(model, photo, semantic, "white-hot", 8, 1, 0)[4] for _ in range(5)]  # new visitors
    assert len(app.kept) == 3 and app.kept.get(others[-1]) is not None and app.kept.get(mine) is None
    with pytest.raises(Vis2IRError, match="this result is no longer kept .* generate again"):
        app.attention(mine, 1, 1)
    assert app.attention(example, 1, 1)  # the opening example is kept for every visitor
    assert len(list((tmp_path / "results").iterdir())) <= 3
    one = app.kept.get(others[-1]).nbytes
    assert one > app.kept.get(others[-1]).visible.nbytes  # the attention maps are counted
    small = Kept(count=10, max_bytes=2 * one)
    keys = [small.put(app.kept.get(others[-1])) for _ in range(4)]
    assert [small.get(k) is not None for k in keys] == [False, False, True, True] and small.nbytes <= 2 * one


class Counted:
    """A pipeline that counts its calls (everything else is the pipeline's own)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pipe(*args, **kwargs)


@pytest.fixture
def counted(models, monkeypatch):
    """The page served with pipelines that count their calls: (url, {label: Counted})."""
    import vis2ir.app

    wrapped = {label: Counted(pipe) for label, pipe in models.items()}
    monkeypatch.setattr(vis2ir.app, "load_models", lambda *a, **k: wrapped)
    port = free_port()
    page = serve(host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/", wrapped
    page.close()


def test_the_opening_example_is_generated_once(counted):
    """Nothing is generated at start-up; the first page load generates the example, every later one gets the
    same result without running the pipeline again."""
    from gradio_client import Client

    url, pipes = counted
    calls = lambda: sum(p.calls for p in pipes.values())  # noqa: E731
    assert calls() == 0
    client = Client(url, verbose=False)
    first = client.predict(api_name="/example")  # what a page load runs
    assert calls() == 1
    again = Client(url, verbose=False).predict(api_name="/example")  # another visitor
    assert calls() == 1
    assert np.array_equal(np.asarray(Image.open(first[2])), np.asarray(Image.open(again[2])))
    assert "attention adapter" in again[4]  # the note: the first model is channel_concat
    assert again[-1] == "example scene_000006.png → infrared by demo (channel_concat)"  # the status line


def test_the_opening_example_is_generated_once_in_a_browser(counted):
    """Two page loads in headless Chromium both show the example's result; the pipeline ran once."""
    from selenium.webdriver.common.by import By

    url, pipes = counted
    browser = _browser()
    try:
        shown = []
        for _ in range(2):
            browser.get(url)
            _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#result img")) >= 2)
            shown.append(browser.find_elements(By.CSS_SELECTOR, "#result img")[1].get_attribute("naturalWidth"))
    finally:
        browser.quit()
    assert shown[0] == shown[1] != "0"
    assert sum(p.calls for p in pipes.values()) == 1
