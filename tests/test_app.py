"""The Gradio demo (app.py): its Run callback on the tiny saved model, and the page driven in headless Chromium.

The browser tests need the Python package playwright and a Chromium executable (Debian's `chromium`, or the path
in `$CHROMIUM`); without them they are skipped, saying which is missing, or fail with `CIA_REQUIRE_BROWSER=1` (as in
CI). Playwright's own browser download is never used.
"""

import os
import shutil
import socket
import tempfile

# Before gradio is imported (as app.py does): no telemetry. Uploads and outputs go to a private folder, removed after
# the tests, not to /tmp/gradio (gradio reads this at import and at call time).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
if "GRADIO_TEMP_DIR" not in os.environ:
    os.environ["GRADIO_TEMP_DIR"] = OWN_GRADIO_TEMP_DIR = tempfile.mkdtemp(prefix="cia-gradio-")
else:
    OWN_GRADIO_TEMP_DIR = None

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cross_image_attention import app  # noqa: E402
from cross_image_attention.cli import EXAMPLE_APPEARANCE, EXAMPLE_STRUCTURE  # noqa: E402
from cross_image_attention.cli import main as cli_main  # noqa: E402

SIZE = 64
# Tiny settings (as the CLI tests'): 4 denoising steps with every feature, unmasked AdaIN.
FAST = {
    "num_timesteps": 6,
    "skip_steps": 2,
    "cross_attn_32_start": 1,
    "cross_attn_32_end": 5,
    "cross_attn_64_start": 1,
    "cross_attn_64_end": 5,
    "adain_start": 2,
    "adain_end": 6,
    "height": SIZE,
    "width": SIZE,
    "use_masked_adain": False,
}
# Generous: a loaded 2-core machine makes even the tiny model slow.
TIMEOUT_MS = 60_000
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module", autouse=True)
def remove_gradio_temp_dir():
    yield
    if OWN_GRADIO_TEMP_DIR is not None:
        shutil.rmtree(OWN_GRADIO_TEMP_DIR, ignore_errors=True)


class RecordedProgress:
    """Stands in for `gr.Progress`: records what the callback reports."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None, total=None, unit="steps"):
        self.calls.append((progress, desc))


@pytest.fixture(scope="module")
def pipe(saved_sd_dir):
    """The tiny saved model, loaded as the demo loads `--model`."""
    pipe = app.load_pipeline(str(saved_sd_dir), "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, appearance, structure, **settings):
    return app.run_transfer(pipe, appearance, structure, **{"domain_name": "animal", **FAST, **settings})


@pytest.fixture(scope="module")
def first_run(pipe, cat_image, astronaut_image):
    """One transfer of the astronaut's look (uploaded in grayscale) onto the cat, and what it reported."""
    progress = RecordedProgress()
    outputs = run(pipe, astronaut_image.convert("L"), cat_image, seed=7, progress=progress)
    return outputs, progress.calls


def test_transfer_and_strip(first_run, cat_image):
    (transfer, strip), progress_calls = first_run
    # The grayscale upload was converted to RGB.
    assert transfer.size == (SIZE, SIZE) and transfer.mode == "RGB"
    assert strip.size == (3 * SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(strip)[:, 2 * SIZE :], np.asarray(transfer))
    # The structure reconstruction comes first, the appearance's second: the left panel is closer to the cat.
    panels = np.asarray(strip, dtype=float).reshape(SIZE, 3, SIZE, 3).transpose(1, 0, 2, 3)
    cat = np.asarray(cat_image.resize((SIZE, SIZE)), dtype=float)
    assert np.abs(panels[0] - cat).mean() < np.abs(panels[1] - cat).mean()
    assert progress_calls == [(0, "Inverting both images")]  # then the pipeline's tqdm bars, tracked by gradio


def test_seed_repeats(first_run, pipe, cat_image, astronaut_image):
    (transfer, _), _ = first_run
    again, _ = run(pipe, astronaut_image.convert("L"), cat_image, seed=7)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(transfer))


@pytest.mark.parametrize(
    ("appearance", "structure", "settings", "expected"),
    [
        (None, "cat", {}, "Upload an appearance image"),
        ("cat", None, {}, "Upload a structure image"),
        ("cat", "cat", {"skip_steps": None}, "Skipped steps (skip_steps) is empty"),
        ("cat", "cat", {"swap_guidance_scale": float("nan")}, "(swap_guidance_scale) is empty"),
        ("cat", "cat", {"seed": -1}, "Seed must be an integer from 0 to 2**64 - 1"),
        ("cat", "cat", {"use_masked_adain": True, "domain_name": "  "}, "Masked AdaIN needs a domain name"),
        ("cat", "cat", {"skip_steps": 6}, "`skip_steps` (6) must be smaller than `num_inference_steps`"),
        ("cat", "cat", {"height": 72}, "`height` must be a multiple of"),
        ("cat", "cat", {"adain_start": 5, "adain_end": 3}, "`adain_range` must satisfy 0 <= start <= end"),
        ("cat", "cat", {"contrast_strength": -1.0}, "`contrast_strength` must be a finite number in [0, 100]"),
        ("cat", "cat", {"num_timesteps": 10_000}, "must be at most 200 in this demo"),
        ("cat", "cat", {"height": 8192}, "at most 1024 pixels in this demo"),
    ],
    ids=[
        "no-appearance",
        "no-structure",
        "empty-number",
        "nan",
        "seed",
        "masked-no-domain",
        "skip",
        "size",
        "range",
        "neg",
        "steps-bound",
        "size-bound",
    ],
)
def test_bad_input_is_a_readable_error(pipe, cat_image, appearance, structure, settings, expected):
    images = {"cat": cat_image, None: None}
    with pytest.raises(gr.Error) as caught:
        run(pipe, images[appearance], images[structure], **settings)
    assert expected in caught.value.message
    assert "\n" not in caught.value.message and "Traceback" not in caught.value.message


def test_main_rejects_a_missing_model(tmp_path, capsys):
    assert app.main(["--model", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("error: --model: no such folder")


def test_build_demo_from_a_model_folder(saved_sd_dir):
    demo = app.build_demo(saved_sd_dir, examples=False)
    assert isinstance(demo, gr.Blocks)
    # The endpoints (one per tab) have real names (not `/partial`), and old uploads are deleted.
    assert [fn.api_name for fn in demo.fns.values() if fn.api_name] == ["transfer", "edit", "style"]
    assert demo.delete_cache == app.DELETE_UPLOADS


# --------------------------------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium started by Playwright (never Playwright's own browser download), headless and offline.

    Skipped when playwright or Chromium is missing, unless `CIA_REQUIRE_BROWSER=1` (CI) makes that a failure.
    """
    missing = pytest.fail if os.environ.get("CIA_REQUIRE_BROWSER") == "1" else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("the browser tests need the playwright package: `pip install playwright` (not `playwright install`)")
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        missing("the browser tests need Chromium: `apt-get install chromium` (or set $CHROMIUM to its path)")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_url(pipe):
    demo = app.build_demo(pipe)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), share=False, quiet=True
    )
    yield url
    demo.close()


@pytest.fixture
def page(chromium, demo_url):
    context = chromium.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    outside = []
    page.on("request", lambda request: outside.append(request.url) if "127.0.0.1" not in request.url else None)
    page.goto(demo_url)
    yield page
    context.close()
    assert outside == [], "the page requested something outside the demo's server"


def upload(page, role: str, path) -> None:
    page.locator(f"#{role} input[type=file]").set_input_files(str(path))
    page.locator(f"#{role} img").wait_for(state="visible")  # the preview


def set_number(page, name: str, value) -> None:
    field = page.locator(f"#{name} input")
    field.fill(str(value))
    field.blur()


def set_fast_settings(page) -> None:
    page.get_by_text("Advanced options").click()
    for name, value in FAST.items():
        if name != "use_masked_adain":
            set_number(page, name, value)
    page.locator("#use_masked_adain input").uncheck()


def natural_size(page, selector: str) -> tuple[int, int]:
    image = page.locator(f"{selector} img")
    image.wait_for(state="visible")
    page.wait_for_function(f"() => document.querySelector('{selector} img').complete")
    return tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def test_browser_upload_run_and_see_the_transfer(page, tmp_path):
    from playwright.sync_api import expect

    expect(page.get_by_text("Cross-Image Attention for Zero-Shot Appearance Transfer")).to_be_visible()
    upload(page, "appearance", EXAMPLE_APPEARANCE)
    upload(page, "structure", EXAMPLE_STRUCTURE)
    set_fast_settings(page)
    page.locator("#run").click()
    assert natural_size(page, "#transfer") == (SIZE, SIZE)
    assert natural_size(page, "#strip") == (3 * SIZE, SIZE)
    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")


def test_browser_bad_input_shows_a_message(page, tmp_path):
    """A bad input is reported as a message in the page, with no traceback and no output. (The pipeline's own
    errors reach the page through the same `gr.Error`; `test_bad_input_is_a_readable_error` covers them on the
    callback, since a number typed in the page can reach the server after a Run clicked right away.)"""
    from playwright.sync_api import expect

    upload(page, "appearance", EXAMPLE_APPEARANCE)
    set_fast_settings(page)
    page.locator("#run").click()  # no structure image
    expect(page.get_by_text("Upload a structure image")).to_be_visible()
    assert "Traceback" not in page.content()
    expect(page.locator("#transfer img")).to_have_count(0)
    screenshot = tmp_path / "errors.png"
    page.screenshot(path=str(screenshot))
    print(f"screenshot: {screenshot}")


def test_browser_example_fills_the_inputs(page):
    page.get_by_text("Example pair (appearance, structure, domain)").scroll_into_view_if_needed()
    page.locator("table tbody tr").first.click()
    page.locator("#appearance img").wait_for(state="visible")
    page.locator("#structure img").wait_for(state="visible")
    assert page.locator("#domain_name textarea, #domain_name input").first.input_value() == "animal"


def test_api_command_line_and_demo_agree_on_one_input(pipe, saved_sd_dir, tmp_path, cat_image, astronaut_image):
    """One source for defaults: without a domain name all three prompt with the reference's "A photo of a object"
    and give the same transfer, up to float rounding (the command line inverts the two images in separate calls,
    and both front ends compute every branch for their strips, so their UNet batches differ from the API's)."""
    paths = {"app": tmp_path / "app.png", "struct": tmp_path / "struct.png"}
    astronaut_image.save(paths["app"])
    cat_image.save(paths["struct"])
    command = [
        "--app_image_path", str(paths["app"]), "--struct_image_path", str(paths["struct"]), "--model",
        str(saved_sd_dir), "--device", "cpu", "--output_path", str(tmp_path / "out"), "--seed", "5",
        "--num_timesteps", "6", "--skip_steps", "2", "--cross_attn_32_range", "1", "5", "--cross_attn_64_range",
        "1", "5", "--adain_range", "2", "6", "--height", str(SIZE), "--width", str(SIZE), "--use_masked_adain",
        "false",
    ]  # fmt: skip
    assert cli_main(command) == 0
    through_cli = np.asarray(PIL.Image.open(tmp_path / "out" / "transfer.png")).astype(int)

    through_demo, _ = run(pipe, astronaut_image, cat_image, domain_name="", seed=5)
    settings = {
        "num_inference_steps": 6,
        "skip_steps": 2,
        "cross_attn_32_range": (1, 5),
        "cross_attn_64_range": (1, 5),
        "adain_range": (2, 6),
        "height": SIZE,
        "width": SIZE,
        "use_masked_adain": False,
        "output_type": "np",
    }
    through_api = pipe(astronaut_image, cat_image, generator=torch.Generator().manual_seed(5), **settings).images[0]
    through_api = (through_api * 255).round().astype(int)
    assert np.abs(np.asarray(through_demo).astype(int) - through_api).max() <= 1
    assert np.abs(through_cli - through_api).max() <= 1
    # The test can fail: the empty prompt (the API's default before) gives another image.
    other = pipe(astronaut_image, cat_image, prompt="", generator=torch.Generator().manual_seed(5), **settings)
    assert np.abs((other.images[0] * 255).round().astype(int) - through_api).max() > 2


def test_edit_and_style_tabs_run_on_the_loaded_weights(pipe, cat_image):
    editing, style = app.sister_pipelines(pipe)
    assert editing.unet is pipe.unet and style.unet is pipe.unet and style.vae is pipe.vae
    edited = app.run_prompt_edit(editing, cat_image, "", "a photo of a tiger", 2, 0.5, 0)
    assert isinstance(edited, PIL.Image.Image) and edited.size == (512, 512)
    images = app.run_style_prompting(style, "low-poly", "A dog", None, "", 1, 2)
    assert len(images) == 2 and all(isinstance(image, PIL.Image.Image) for image in images)
    # The UNet's processors are the user's again after both.
    assert all(type(p).__name__ != "ControlledAttnProcessor" for p in pipe.unet.attn_processors.values())
    with pytest.raises(gr.Error, match="target prompt"):
        app.run_prompt_edit(editing, cat_image, "", "  ", 2, 0.5, 0)
    with pytest.raises(gr.Error, match="Describe the reference image"):
        app.run_style_prompting(style, "low-poly", "", cat_image, "", 1, 2)
    with pytest.raises(gr.Error, match="Images must be from 1 to 8"):
        app.run_style_prompting(style, "low-poly", "", None, "", 0, 2)
