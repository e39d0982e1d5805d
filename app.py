"""Gradio demo for HART: type a prompt, watch the next-scale tokens appear, compare discrete vs hybrid.

Run `python app.py [--host H] [--port P] [--model PATH_OR_HUB_ID] [--share]`. The model comes from
--model / $HART_MODEL, else the bundled `assets/hart-emoji/`, else a random-weight "tiny" preset.
An official checkpoint also needs its text encoder: set $HART_TEXT_ENCODER (folder or hub id).
On a Hugging Face Space ($SPACE_ID set) the server binds 0.0.0.0 and ZeroGPU is used when present.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
import secrets
import threading
from typing import Any, Iterator

try:  # Hugging Face ZeroGPU; imported before torch, as ZeroGPU asks
    import spaces
except ImportError:
    spaces = None
import gradio as gr
import numpy as np
from PIL import Image

from hart.pipeline import BUNDLED_MODEL

# Seconds of GPU that ZeroGPU grants one call of `generate`: one 1024 px generation of up to 4 images.
# Not measured on a GPU: the 0.7B model costs 27.4 TMAC (55 TFLOP) per 1024 px image with cfg
# (BENCHMARKS.md), 220 TFLOP for 4 images, about 22 s in fp32 at a sustained 10 TFLOP/s on an A100-class
# slice; moving the 0.7B transformer and the 1.5B Qwen2 text encoder (about 9 GB in fp32) to the GPU adds
# a few seconds. Twice that, rounded up: 60 s. A shorter duration gets visitors a GPU sooner.
GPU_DURATION = 60


def gpu_task(fn):
    """`spaces.GPU(duration=GPU_DURATION)` on ZeroGPU (the `spaces` package is importable); else `fn` as is."""
    return spaces.GPU(duration=GPU_DURATION)(fn) if spaces is not None else fn


TINY = "tiny (random weights)"
MAX_SEED = 2**31 - 1
MAX_PROMPT = 500
MODEL_TOP_K = -1  # top-k control value meaning "the model's own per-scale schedule" (official: 600, then 300)
EXAMPLES = ["red apple", "grinning face", "waving hand: medium skin tone", "rocket", "sunflower",
            "an emoji of a cat face"]
# gradio 6 takes css/theme in launch(), not Blocks(): main() and the tests pass these along.
CSS = """
#image_discrete img, #image_hybrid img, #image_residual img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;
}
"""


def side_by_side(images: list[Image.Image]) -> Image.Image | None:
    """Images pasted left to right at native size (a single image is returned as is)."""
    if len(images) <= 1:
        return images[0] if images else None
    canvas = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def residual_heatmap(hybrid: Image.Image, discrete: Image.Image) -> Image.Image:
    """Per-pixel magnitude of what the residual changed, black -> red -> yellow -> white.

    |hybrid - discrete| averaged over the colour channels, scaled so the largest change is white."""
    change = np.abs(np.asarray(hybrid.convert("RGB"), np.float32)
                    - np.asarray(discrete.convert("RGB"), np.float32)).mean(-1)
    v = change / max(float(change.max()), 1e-6)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def error(message: str) -> gr.Error:
    """A user-facing error (shown in the UI, raised by gradio_client) without a server traceback."""
    return gr.Error(message, print_exception=False)


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="orange")


def default_sources(model: str | None = None) -> dict[str, str | None]:
    """Model name -> location (None = the tiny preset): --model first, then the bundled folder."""
    sources: dict[str, str | None] = {}
    if model:
        sources[Path(model).name or model] = model
    if (BUNDLED_MODEL / "model_index.json").is_file():
        sources.setdefault(BUNDLED_MODEL.name, str(BUNDLED_MODEL))
    sources[TINY] = None
    return sources


class ModelRegistry:
    """Loads each named model on first use, once, and keeps it for the life of the server."""

    def __init__(self, sources: dict[str, str | None], device: str | None = None):
        import torch
        self.sources = dict(sources)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def get(self, name: str):
        if name not in self.sources:
            raise error(f"unknown model {name!r}; choose one of {self.names}")
        with self._lock:
            if name not in self._cache:
                self._cache[name] = self._load(self.sources[name])
            return self._cache[name]

    def _load(self, location: str | None):
        from hart import HARTPipeline
        try:
            if location is None:
                return HARTPipeline.from_preset("tiny").to(self.device)
            return HARTPipeline.from_pretrained(location, text_encoder=os.environ.get("HART_TEXT_ENCODER"),
                                                device=self.device)
        except Exception as err:  # a broken checkpoint must not take the server down
            raise error(f"could not load model from {location}: {err}") from err


def number(name: str, value: Any, lo: float, hi: float, integer: bool = False, above: bool = False) -> Any:
    """Coerce and range-check one value; `above` makes the lower bound exclusive."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number, got {value!r}") from None
    bounds = f"({lo}, {hi}]" if above else f"[{lo}, {hi}]"
    if not math.isfinite(v) or v > hi or v < lo or (above and v == lo):
        raise error(f"{name} must be in {bounds}, got {value!r}")
    if integer and v != int(v):
        raise error(f"{name} must be a whole number, got {value!r}")
    return int(v) if integer else v


def check_inputs(prompt: str | None, cfg: Any, diffusion_steps: Any, use_residual: Any, top_k: Any, top_p: Any,
                 temperature: Any, more_smooth: Any, num_images: Any) -> tuple[str, dict, int]:
    """Validated (prompt, sampling options, image count); gr.Error names the offending value."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise error("Please enter a prompt.")
    if len(prompt) > MAX_PROMPT:
        raise error(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT}.")
    opts = dict(cfg=number("cfg", cfg, 0, 20), diffusion_steps=number("diffusion steps", diffusion_steps, 1, 50, True),
                use_residual=bool(use_residual), top_k=number("top-k", top_k, MODEL_TOP_K, 1e9, True),
                top_p=number("top-p", top_p, 0, 1), temperature=number("temperature", temperature, 0, 10, above=True),
                more_smooth=bool(more_smooth))
    if opts["top_k"] == MODEL_TOP_K:
        opts["top_k"] = None  # the model's own per-scale schedule
    return prompt, opts, number("number of images", num_images, 1, 4, True)


def top_k_control(top_k: int | tuple[int, ...]) -> int:
    """The top-k slider's value for a model default: a per-scale schedule shows as MODEL_TOP_K."""
    return MODEL_TOP_K if isinstance(top_k, tuple) else top_k


def info_text(model: str, seed: int, resolution: int, opts: dict, timings: dict, count: int) -> str:
    t = {k: f"{timings.get(k, 0.0):.2f} s" for k in ("text", "ar", "diffusion", "decode", "total")}
    residual = f"on, {opts['diffusion_steps']} steps" if opts["use_residual"] else "off"
    top_k = "per-scale schedule" if opts["top_k"] is None else opts["top_k"]
    images = f"{count} images, seeds {seed}–{seed + count - 1}" if count > 1 else "1 image"
    # above the lowest resolution a model may take its coarse scales from a low-resolution pass first
    coarse = f"low-resolution pass {timings['coarse']:.2f} s · " if "coarse" in timings else ""
    return (f"**Seed: {seed}** · {resolution}px · {images} · model: {model}\n"
            f"cfg {opts['cfg']:g} · residual {residual} · top-k {top_k} · top-p {opts['top_p']:g} · "
            f"temperature {opts['temperature']:g} · more smooth {'on' if opts['more_smooth'] else 'off'}\n"
            f"Timings: text {t['text']} · {coarse}AR {t['ar']} · residual diffusion {t['diffusion']} · "
            f"decode {t['decode']} · **total {t['total']}**")


def build_demo(model_sources: dict[str, str | None] | None = None, default: str | None = None) -> gr.Blocks:
    """The whole UI; loads the default model (the first that loads) to fill in its defaults."""
    registry = ModelRegistry(model_sources or default_sources(os.environ.get("HART_MODEL")))
    order = [default] + [n for n in registry.names if n != default] if default else registry.names
    pipe, load_errors = None, []
    for default in order:  # the first model that loads becomes the default
        try:
            pipe = registry.get(default)
            break
        except gr.Error as err:
            load_errors.append(err.message)
            print(f"warning: {err.message}")
    if pipe is None:
        raise RuntimeError("no model could be loaded: " + "; ".join(load_errors))
    d = pipe.sampling_defaults

    @gpu_task
    def generate(prompt: str, resolution: Any, cfg: float, diffusion_steps: float, use_residual: bool,
                 seed: float, randomize_seed: bool, top_k: float, top_p: float, temperature: float,
                 more_smooth: bool, num_images: float, model: str, progress: gr.Progress = gr.Progress()
                 ) -> Iterator[tuple]:
        prompt, opts, count = check_inputs(prompt, cfg, diffusion_steps, use_residual, top_k, top_p, temperature,
                                           more_smooth, num_images)
        seed = secrets.randbelow(MAX_SEED + 1) if randomize_seed else number("seed", seed, 0, MAX_SEED, True)
        pipe = registry.get(model)
        res = number("resolution", resolution, 1, math.inf, True)
        if res not in pipe.resolutions:
            raise error(f"Resolution {resolution} is not available for model {model!r}; "
                        f"choose one of {pipe.resolutions}.")
        scales = len(pipe.schedules[res])
        progress(0, desc="encoding prompt")
        try:
            for item in pipe.stream(prompt, resolution=res, seed=seed, num_images=count, **opts):
                if isinstance(item, tuple):
                    k = item[0] + 1
                    progress((k, scales), desc=f"scale {k}/{scales}")
                    yield side_by_side(item[1]), None, None, f"Generating: scale {k}/{scales} (seed {seed})"
                else:
                    result = item
        except ValueError as err:
            raise error(str(err)) from err
        # without the residual head the pipeline hands back the discrete images as its images
        with_residual = bool(use_residual and result.discrete_images) and result.images is not result.discrete_images
        heat = [residual_heatmap(h, d) for h, d in zip(result.images, result.discrete_images)] if with_residual else []
        yield (side_by_side(result.discrete_images), side_by_side(result.images) if with_residual else None,
               side_by_side(heat) if with_residual else None,
               info_text(model, result.seed, res, opts, result.timings, count))

    def on_model_change(model: str) -> tuple:
        p = registry.get(model)
        s = p.sampling_defaults
        return (gr.update(choices=p.resolutions, value=p.default_resolution), s.cfg,
                min(max(s.diffusion_steps, 1), 50), top_k_control(s.top_k), s.top_p, s.temperature)

    with gr.Blocks(title="HART text-to-image") as demo:
        note = " **Random weights: images are noise.** Train or bundle a model to get pictures." \
            if default == TINY else ""
        gr.Markdown("## HART: hybrid autoregressive text-to-image\nTokens are sampled scale by scale "
                    "(discrete), then a small diffusion head adds the continuous residual (hybrid). "
                    f"Default model: `{default}`.{note}")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", placeholder="e.g. red apple", max_length=MAX_PROMPT,
                                    lines=1, max_lines=3, elem_id="prompt")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                resolution = gr.Dropdown(pipe.resolutions, value=pipe.default_resolution, label="Resolution (px)",
                                         allow_custom_value=True, elem_id="resolution")
                cfg = gr.Slider(0, 20, value=d.cfg, step=0.1, label="Guidance (cfg)", elem_id="cfg")
                steps = gr.Slider(1, 50, value=min(max(d.diffusion_steps, 1), 50), step=1,
                                  label="Residual diffusion steps", elem_id="diffusion_steps")
                use_residual = gr.Checkbox(d.use_residual, label="Use residual (hybrid)", elem_id="use_residual")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                    randomize = gr.Checkbox(True, label="Randomize seed", elem_id="randomize_seed")
                with gr.Accordion("Advanced", open=False):
                    top_k = gr.Slider(MODEL_TOP_K, 1000, value=top_k_control(d.top_k), step=1, elem_id="top_k",
                                      label="Top-k (0 = off, -1 = the model's per-scale schedule)")
                    top_p = gr.Slider(0, 1, value=d.top_p, step=0.01, label="Top-p (0 = off)", elem_id="top_p")
                    temperature = gr.Slider(0.05, 2, value=d.temperature, step=0.05, label="Temperature",
                                            elem_id="temperature")
                    more_smooth = gr.Checkbox(d.more_smooth, label="More smooth (Gumbel mixture of codes)",
                                              elem_id="more_smooth")
                    num_images = gr.Slider(1, 4, value=1, step=1, label="Number of images (shown side by side)",
                                           elem_id="num_images")
                    model = gr.Dropdown(registry.names, value=default, label="Model", elem_id="model")
                gr.Examples([[p] for p in EXAMPLES], inputs=[prompt], api_visibility="private")
            with gr.Column(scale=3):
                image_kw = dict(type="pil", format="png", height=320, interactive=False,
                                buttons=["download", "fullscreen"])
                with gr.Row():
                    discrete = gr.Image(label="Discrete only", elem_id="image_discrete", **image_kw)
                    hybrid = gr.Image(label="Hybrid: discrete + residual", elem_id="image_hybrid", **image_kw)
                with gr.Row():
                    residual = gr.Image(label="What the residual added (heat map)", elem_id="image_residual",
                                        **image_kw)
                    info = gr.Markdown("Press **Generate** or Enter.", line_breaks=True, elem_id="info")
        gr.on([run.click, prompt.submit], generate,
              inputs=[prompt, resolution, cfg, steps, use_residual, seed, randomize, top_k, top_p, temperature,
                      more_smooth, num_images, model],
              outputs=[discrete, hybrid, residual, info], api_name="generate", show_progress_on=[hybrid])
        model.change(on_model_change, model, [resolution, cfg, steps, top_k, top_p, temperature],
                     api_visibility="private")
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> None:
    on_space = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=os.environ.get("HART_MODEL"),
                        help="pipeline folder, official checkpoint or hub id (default: $HART_MODEL)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = parser.parse_args(argv)
    demo = build_demo(default_sources(args.model))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, theme=theme())


if __name__ == "__main__":
    main()
