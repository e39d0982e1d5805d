"""The Gradio demo end to end: a real server in-process, gradio_client calls and a headless Chromium."""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import app
from hart import HARTPipeline
from hart.presets import get_preset

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest single-threaded; 2-core machines thrash otherwise
    broken = tmp_path_factory.mktemp("broken")  # exists, but holds no model
    mini = HARTPipeline.from_preset("tiny")  # a saved second model: 32px only, its own cfg default
    mini.schedules, mini.sampling_defaults.cfg = {32: mini.schedules[32]}, 5.0
    mini.save_pretrained(mini_dir := tmp_path_factory.mktemp("mini"))
    demo = app.build_demo({app.TINY: None, "broken": str(broken), "mini": str(mini_dir)})
    yield demo
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(demo):
    port = free_port()
    demo.queue(max_size=16, default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app.CSS,
        theme=app.theme())
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server, verbose=False)


def generate(client: Client, prompt: str = "red apple", resolution: int = 64, cfg: float = 3.0,
             diffusion_steps: int = 8, use_residual: bool = True, seed: int = 123, randomize_seed: bool = False,
             top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0, more_smooth: bool = False,
             num_images: int = 1, model: str = app.TINY) -> tuple:
    return client.predict(prompt, resolution, cfg, diffusion_steps, use_residual, seed, randomize_seed, top_k,
                          top_p, temperature, more_smooth, num_images, model, api_name="/generate")


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def seed_of(info: str) -> int:
    return int(re.search(r"Seed: (\d+)", info).group(1))


def test_single_api_endpoint(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/generate"] and not api["unnamed_endpoints"]
    names = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert names == ["prompt", "resolution", "cfg", "diffusion_steps", "use_residual", "seed", "randomize_seed",
                     "top_k", "top_p", "temperature", "more_smooth", "num_images", "model"]


def test_same_seed_same_pixels_native_png(client):
    first, second = generate(client), generate(client)
    for a, b in zip(first[:3], second[:3]):
        assert a.endswith(".png") and Image.open(a).size == (64, 64)
        assert np.array_equal(pixels(a), pixels(b))
    info = first[3]
    assert seed_of(info) == 123 and "64px" in info and app.TINY in info
    for stage in ("text", "AR", "residual diffusion", "decode", "total"):
        assert stage in info


def test_cfg_changes_the_image(client):
    a, b = generate(client, cfg=3.0), generate(client, cfg=10.0)
    assert not np.array_equal(pixels(a[1]), pixels(b[1]))


def test_diffusion_steps_change_hybrid_only(client):
    a, b = generate(client, diffusion_steps=8), generate(client, diffusion_steps=2)
    assert np.array_equal(pixels(a[0]), pixels(b[0]))
    assert not np.array_equal(pixels(a[1]), pixels(b[1]))


def test_residual_off_gives_discrete_only(client):
    discrete, hybrid, residual, info = generate(client, use_residual=False)
    assert discrete is not None and hybrid is None and residual is None
    assert "residual off" in info


def test_randomize_seed_reports_the_seed_used(client):
    random_run = generate(client, seed=123, randomize_seed=True)
    used = seed_of(random_run[3])
    assert used != 123
    replay = generate(client, seed=used)
    assert np.array_equal(pixels(random_run[1]), pixels(replay[1]))


def test_several_images_side_by_side(client):
    discrete, hybrid, residual, info = generate(client, resolution=32, num_images=3)
    assert Image.open(discrete).size == Image.open(hybrid).size == Image.open(residual).size == (96, 32)
    assert "3 images, seeds 123–125" in info
    # the middle image is the one its seed gives alone (batched kernels may round a level apart)
    _, alone, _, alone_info = generate(client, resolution=32, seed=124)
    assert "Seed: 124" in alone_info and "1 image" in alone_info
    middle = pixels(hybrid)[:, 32:64].astype(int)
    assert abs(middle - pixels(alone)).max() <= 2


def test_streams_a_preview_per_scale(client):
    job = client.submit("red apple", 64, 3.0, 8, True, 7, False, 0, 0.0, 1.0, False, 1, app.TINY,
                        api_name="/generate")
    final = job.result(timeout=60)
    outputs = job.outputs()
    scales = len(get_preset("tiny").resolutions[64])
    previews = [o for o in outputs if "scale" in o[3]]
    assert len(previews) in (scales - 1, scales)  # the last scale may arrive only as the final result
    assert [o[3].split(" (")[0] for o in previews] == [f"Generating: scale {k}/{scales}"
                                                       for k in range(1, len(previews) + 1)]
    assert all(o[0] is not None and o[1] is None for o in previews)
    assert tuple(outputs[-1]) == tuple(final) and seed_of(final[3]) == 7


@pytest.mark.parametrize("overrides, message", [
    (dict(prompt=""), "enter a prompt"),
    (dict(prompt="   "), "enter a prompt"),
    (dict(prompt="x" * 501), "limit is 500"),
    (dict(cfg=25), "maximum value 20"),
    (dict(diffusion_steps=0), "minimum value 1"),
    (dict(resolution=999), "Resolution 999 is not available"),
    (dict(num_images=5), "maximum value 4"),
    (dict(top_p=1.5), "maximum value 1"),
    (dict(temperature=0), "minimum value 0.05"),
    (dict(top_k=-2), "minimum value -1"),
    (dict(model="broken"), "could not load model"),
], ids=["empty_prompt", "blank_prompt", "long_prompt", "cfg_25", "steps_0", "resolution_999", "num_images_5",
        "top_p_1.5", "temperature_0", "top_k_-2", "broken_model"])
def test_bad_inputs_raise(client, overrides, message):
    with pytest.raises(AppError, match=message):
        generate(client, **overrides)


def test_server_survives_bad_inputs(client):
    with pytest.raises(AppError):
        generate(client, resolution=999)
    assert generate(client)[1] is not None


def test_second_model_from_a_saved_folder(demo, client):
    switch = next(f.fn for f in demo.fns.values() if f.name == "on_model_change")
    resolution, cfg, *_ = switch("mini")
    assert resolution["choices"] == [32]
    assert resolution["value"] == 32 and cfg == 5.0
    discrete, hybrid, residual, info = generate(client, model="mini", resolution=32)
    assert Image.open(hybrid).size == (32, 32) and "model: mini" in info
    with pytest.raises(AppError, match="Resolution 64 is not available for model 'mini'"):
        generate(client, model="mini", resolution=64)


def test_main_defaults_and_flags(monkeypatch):
    calls = []

    class FakeDemo:
        def launch(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(app, "build_demo", lambda sources: calls.append(sources) or FakeDemo())
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("HART_MODEL", "some/where")
    app.main([])
    sources, kwargs = calls[-2:]
    assert list(sources)[0] == "where" and sources["where"] == "some/where"
    assert (kwargs["server_name"], kwargs["server_port"], kwargs["share"]) == ("127.0.0.1", 7860, False)
    assert kwargs["css"] == app.CSS
    monkeypatch.setenv("SPACE_ID", "me/hart")
    app.main(["--port", "9000", "--model", "other/m", "--share"])
    sources, kwargs = calls[-2:]
    assert "m" in sources and (kwargs["server_name"], kwargs["server_port"], kwargs["share"]) == ("0.0.0.0", 9000, True)


def test_handler_checks_values_itself():
    """What the widgets already refuse is refused by the handler's own checks too (direct calls, other UIs)."""
    good = dict(prompt=" red apple ", cfg=3, diffusion_steps=8.0, use_residual=1, top_k=0, top_p=0.5,
                temperature=1, more_smooth=0, num_images=2)
    prompt, opts, count = app.check_inputs(**good)
    assert (prompt, opts["diffusion_steps"], opts["use_residual"], count) == ("red apple", 8, True, 2)
    for bad, message in [(dict(prompt=None), "enter a prompt"), (dict(cfg=float("nan")), "cfg must be in"),
                         (dict(cfg=20.5), "cfg must be in"), (dict(diffusion_steps=2.5), "whole number"),
                         (dict(diffusion_steps=51), "diffusion steps must be in"), (dict(top_k=-2), "top-k"),
                         (dict(top_p=-0.1), "top-p"), (dict(temperature=0), r"temperature must be in \(0"),
                         (dict(num_images=0), "number of images"), (dict(cfg="abc"), "must be a number")]:
        with pytest.raises(app.gr.Error, match=message):
            app.check_inputs(**{**good, **bad})


def test_top_k_minus_one_keeps_the_models_per_scale_schedule():
    good = dict(prompt="red apple", cfg=3, diffusion_steps=8, use_residual=True, top_k=-1, top_p=0,
                temperature=1, more_smooth=False, num_images=1)
    assert app.check_inputs(**good)[1]["top_k"] is None  # None: the pipeline keeps its default
    assert app.check_inputs(**{**good, "top_k": 7})[1]["top_k"] == 7
    assert app.top_k_control((600, 300)) == app.MODEL_TOP_K == -1 and app.top_k_control(50) == 50
    pipe = HARTPipeline.from_preset("tiny")
    pipe.sampling_defaults.top_k = (1, 0)
    _, opts, _ = app.check_inputs(**good)
    result = pipe("red apple", resolution=32, seed=0, **opts)
    greedy = pipe("red apple", resolution=32, seed=0, top_k=1)
    unfiltered = pipe("red apple", resolution=32, seed=0, top_k=0)
    assert result.images[0].tobytes() not in (greedy.images[0].tobytes(), unfiltered.images[0].tobytes())


def test_registry_loads_once_and_sources(tmp_path, monkeypatch):
    registry = app.ModelRegistry({app.TINY: None}, device="cpu")
    assert registry.get(app.TINY) is registry.get(app.TINY)
    with pytest.raises(app.gr.Error, match="unknown model"):
        registry.get("nope")
    monkeypatch.setattr(app, "BUNDLED_MODEL", tmp_path / "hart-emoji")
    assert app.default_sources() == {app.TINY: None}
    (tmp_path / "hart-emoji").mkdir()
    (tmp_path / "hart-emoji" / "model_index.json").write_text("{}")
    assert list(app.default_sources("org/my-hart")) == ["my-hart", "hart-emoji", app.TINY]


def test_build_falls_back_when_default_is_broken(tmp_path):
    demo = app.build_demo({"broken": str(tmp_path), app.TINY: None})
    model = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
    assert model.value == app.TINY


def test_browser_renders_both_images(server, tmp_path):
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} not installed")
    from playwright.sync_api import sync_playwright
    shot = tmp_path / "screenshot.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server, wait_until="domcontentloaded")
            page.fill("#prompt textarea", "grinning face")
            page.click("#generate")
            for selector in ("#image_discrete img", "#image_hybrid img", "#image_residual img"):
                page.wait_for_selector(selector, timeout=60_000)
            page.wait_for_function("document.querySelector('#info').innerText.includes('total')",
                                   timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('#image_hybrid img')].every("
                                   "i => i.complete && i.naturalWidth > 0)", timeout=60_000)
            rendering = page.eval_on_selector("#image_hybrid img", "i => getComputedStyle(i).imageRendering")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert rendering == "pixelated"
    assert shot.stat().st_size > 20_000
    assert len(np.unique(pixels(str(shot)).reshape(-1, 3), axis=0)) > 50
    if os.environ.get("HART_UPDATE_SCREENSHOT") == "1":
        (ROOT / "assets").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "assets" / "screenshot.png")


def test_heatmap_and_side_by_side_are_app_helpers():
    discrete = Image.new("RGB", (4, 2), (10, 10, 10))
    hybrid = discrete.copy()
    hybrid.putpixel((1, 0), (60, 10, 10))    # the largest change: white
    hybrid.putpixel((2, 1), (15, 10, 10))    # a tenth of it: dark red
    heat = np.asarray(app.residual_heatmap(hybrid, discrete))
    assert heat.shape == (2, 4, 3)
    assert tuple(heat[0, 1]) == (255, 255, 255) and tuple(heat[0, 0]) == (0, 0, 0)
    assert heat[1, 2, 0] > 0 and heat[1, 2, 1] == heat[1, 2, 2] == 0
    assert not np.asarray(app.residual_heatmap(discrete, discrete)).any()
    row = app.side_by_side([discrete, hybrid, discrete])
    assert row.size == (12, 2) and np.array_equal(np.asarray(row)[:, 4:8], np.asarray(hybrid))
    assert app.side_by_side([hybrid]) is hybrid and app.side_by_side([]) is None


def test_zero_gpu_wraps_generation(monkeypatch):
    """With the `spaces` package (ZeroGPU) the generation handler asks for GPU_DURATION seconds; without, as is."""
    asked = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):
            def wrap(fn):
                asked.append((fn.__name__, duration))
                fn.on_gpu = True
                return fn
            return wrap

    def work():
        pass

    monkeypatch.setattr(app, "spaces", None)
    assert app.gpu_task(work) is work and not hasattr(work, "on_gpu")
    monkeypatch.setattr(app, "spaces", FakeSpaces)
    demo = app.build_demo({app.TINY: None})
    assert asked == [("generate", app.GPU_DURATION)]
    assert next(f.fn for f in demo.fns.values() if f.name == "generate").on_gpu
    assert 30 <= app.GPU_DURATION <= 120


def test_registry_passes_the_text_encoder_variable(monkeypatch):
    seen = []
    monkeypatch.setattr(HARTPipeline, "from_pretrained",
                        classmethod(lambda cls, path, text_encoder=None, device="cpu": seen.append(
                            (path, text_encoder, device)) or "pipe"))
    monkeypatch.setenv("HART_TEXT_ENCODER", "org/encoder")
    assert app.ModelRegistry({"m": "org/model"}, device="cpu").get("m") == "pipe"
    assert seen == [("org/model", "org/encoder", "cpu")]
