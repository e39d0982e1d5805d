"""HARTPipeline: prompt -> text states -> next-scale tokens -> residual -> decoded images.

A saved pipeline is a folder with `model_index.json` and one sub-folder per component
(`tokenizer/`, `transformer/`, `text_encoder/`), each `config.json` + `model.safetensors`.
The official release layout (`llm/` + `tokenizer/`) and hub ids load too."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import secrets
import time
from typing import Iterator

import torch
from PIL import Image

from .checkpoint import (CheckpointError, config_from_dict, load_into, read_json, read_weights, write_json,
                         write_weights)
from .presets import get_preset
from .sampler import SampleOutput, SamplingOptions, iter_sample, sample, sample_residual
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import HybridTokenizer, TokenizerConfig
from .transformer import HARTTransformer, TransformerConfig

FORMAT = "hart-pipeline"
# the embedded default model shipped with the repository
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "hart-emoji"
# VAR's 512px schedule, offered next to a 1024px official checkpoint's own schedule
OFFICIAL_512_SCHEDULE = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass
class GenerationResult:
    images: list[Image.Image]            # hybrid images (discrete-only when the residual head is off)
    discrete_images: list[Image.Image]   # the same sampled tokens decoded without the residual
                                         # (empty when asked not to decode them)
    seed: int                            # the first image's seed; image i was drawn with seeds[i]
    resolution: int
    timings: dict[str, float] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (rounded, not truncated)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def hold_matmul_weights(modules, dtype: torch.dtype | None, masters: dict) -> None:
    """Hold the Linear / Conv2d weights of `modules` in `dtype` (None: back to the fp32 masters).

    `masters` keeps the fp32 originals between calls. Under autocast to the same dtype the
    results are unchanged (autocast casts those weights to exactly these values), only the
    per-call casts go."""
    for module in (m for root in modules for m in root.modules()):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        for param in module.parameters(recurse=False):
            master = masters.pop(param, None)
            if master is not None:
                param.data = master
            if dtype is not None and dtype != param.dtype:
                masters[param] = param.data
                param.data = param.data.to(dtype)


class HARTPipeline:
    def __init__(self, tokenizer: HybridTokenizer, transformer: HARTTransformer, text_encoder: TextEncoder,
                 resolutions: dict[int, tuple[int, ...]], sampling: dict | None = None, name: str = "hart"):
        self.tokenizer = tokenizer.eval()
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder
        self.schedules = {int(k): tuple(v) for k, v in resolutions.items()}
        self.sampling_defaults = SamplingOptions(**(sampling or {}))
        self.name = name
        self._autocast_dtype: torch.dtype | None = None
        self._fp32_weights: dict[torch.nn.Parameter, torch.Tensor] = {}  # masters while lower precision is held
        ds = tokenizer.config.downsample
        for res, sizes in self.schedules.items():
            if sizes[-1] * ds != res:
                raise ValueError(f"resolution {res}: last scale {sizes[-1]} x {ds} does not give {res}px")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, text_encoder: TextEncoder | None = None, seed: int = 0) -> "HARTPipeline":
        """Randomly initialised models of a named preset (seeded, so two calls agree)."""
        preset = get_preset(name)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tokenizer = HybridTokenizer(preset.tokenizer)
            transformer = HARTTransformer(preset.transformer)
        text_encoder = text_encoder or TextEncoder.from_config(preset.text_encoder)
        return cls(tokenizer, transformer, text_encoder, preset.resolutions, preset.sampling, name)

    @classmethod
    def from_pretrained(cls, path: str | Path, text_encoder: TextEncoder | str | None = None,
                        use_ema: bool = True, system_prompt: str | None = None, text_dtype: str = "float32",
                        device: str | torch.device = "cpu") -> "HARTPipeline":
        """Load our format, the official layout (folder or its llm/), or a hub repo id.

        Official checkpoints get the official text conditioning and sampling defaults: prompts
        encoded behind the official system prompt (`system_prompt=None`; pass "" to encode the
        prompt alone, or another text), cfg 4.5 and top-k 600 for the first 7 scales, then 300."""
        path = Path(path)
        if not path.exists():
            path = Path(_download(str(path)))
        if (path / "model_index.json").is_file():
            pipe = cls._load_ours(path, text_encoder, use_ema)
        else:
            from .official import OFFICIAL_SAMPLING, OFFICIAL_SYSTEM_PROMPT, is_official_layout, load_official
            root = path.parent if path.name == "llm" else path
            if not is_official_layout(root):
                raise CheckpointError(f"{path} is neither a HART pipeline folder (model_index.json) nor an "
                                      "official checkpoint (llm/config.json + tokenizer/config.json)")
            tokenizer, transformer = load_official(root, use_ema=use_ema)
            if system_prompt is None:
                system_prompt = OFFICIAL_SYSTEM_PROMPT
            text_encoder = _official_text_encoder(text_encoder, transformer.config, system_prompt, text_dtype)
            sizes = transformer.config.patch_nums
            res = sizes[-1] * tokenizer.config.downsample
            resolutions = {res: sizes}
            if res == 1024:
                resolutions[512] = OFFICIAL_512_SCHEDULE
            pipe = cls(tokenizer, transformer, text_encoder, resolutions,
                       OFFICIAL_SAMPLING | {"diffusion_steps": transformer.config.num_sampling_steps},
                       name=root.name)
        return pipe.to(device)

    @classmethod
    def _load_ours(cls, path: Path, text_encoder, use_ema: bool) -> "HARTPipeline":
        index = read_json(path / "model_index.json")
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{path / 'model_index.json'} is not a {FORMAT} index")
        tok_cfg = config_from_dict(TokenizerConfig, read_json(path / "tokenizer" / "config.json"),
                                   str(path / "tokenizer" / "config.json"))
        tf_cfg = config_from_dict(TransformerConfig, read_json(path / "transformer" / "config.json"),
                                  str(path / "transformer" / "config.json"))
        tokenizer, transformer = HybridTokenizer(tok_cfg), HARTTransformer(tf_cfg)
        load_into(tokenizer, read_weights(path / "tokenizer" / "model.safetensors"),
                  str(path / "tokenizer" / "model.safetensors"))
        tf_file = path / "transformer" / "model.safetensors"
        if not use_ema and (path / "transformer" / "model_raw.safetensors").is_file():
            tf_file = path / "transformer" / "model_raw.safetensors"
        load_into(transformer, read_weights(tf_file), str(tf_file))
        if text_encoder is None:
            te_cfg = config_from_dict(TextEncoderConfig, read_json(path / "text_encoder" / "config.json"),
                                      str(path / "text_encoder" / "config.json"))
            weights_file = path / "text_encoder" / "model.safetensors"
            weights = read_weights(weights_file) if weights_file.is_file() else None
            text_encoder = TextEncoder.from_config(te_cfg, weights)
        elif isinstance(text_encoder, str):
            text_encoder = TextEncoder.from_config(TextEncoderConfig(kind="hf", path=text_encoder,
                                                                     max_length=tf_cfg.context_token))
        if text_encoder.hidden_size != tf_cfg.context_dim:
            raise CheckpointError(f"text encoder width {text_encoder.hidden_size} does not match the "
                                  f"transformer's context_dim {tf_cfg.context_dim}")
        resolutions = {int(k): tuple(v) for k, v in index["resolutions"].items()}
        return cls(tokenizer, transformer, text_encoder, resolutions, index.get("sampling"),
                   index.get("name", path.name))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Generate under autocast to this dtype (e.g. torch.bfloat16 on CPUs with bf16 units); None = fp32."""
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        """While a lower precision is set, the Linear / Conv2d weights of the transformer and the
        tokenizer are held in it (fp32 masters kept aside, restored when set back to None).

        Autocast would cast them to the same values on every call anyway: its weight cache is off
        under inference_mode and dropped whenever a scale's context exits, so each scale re-cast
        every weight (measured: a 1536 x 6144 linear at batch 2 ran 4.5x slower than with bf16
        weights). Outputs are bit-identical to plain autocast."""
        hold_matmul_weights([self.transformer, self.tokenizer], dtype, self._fp32_weights)
        self._autocast_dtype = dtype

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        held, self.autocast_dtype = self.autocast_dtype, None  # write the fp32 masters
        try:
            write_pipeline(path, self.tokenizer, self.transformer, self.text_encoder.config_dict(),
                           self.schedules, asdict(self.sampling_defaults), self.name, dtype,
                           self.text_encoder.extra_weights())
        finally:
            self.autocast_dtype = held

    def to(self, device) -> "HARTPipeline":
        held, self.autocast_dtype = self.autocast_dtype, None  # move the fp32 masters, then re-derive
        self.tokenizer.to(device)
        self.transformer.to(device)
        self.text_encoder.to(device)
        self.autocast_dtype = held
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embed.weight.device

    @property
    def resolutions(self) -> list[int]:
        return sorted(self.schedules)

    @property
    def default_resolution(self) -> int:
        return self.resolutions[0]

    # ------------------------------------------------------------------ generation
    def _prepare(self, prompt, resolution, num_images, seed, overrides) -> tuple:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt list is empty: give at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        resolution = self.default_resolution if resolution is None else int(resolution)
        if resolution not in self.schedules:
            raise ValueError(f"resolution {resolution} is not supported by this model; "
                             f"choose one of {self.resolutions}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images}")
        values = asdict(self.sampling_defaults)
        values.update({k: v for k, v in overrides.items() if v is not None})
        opts = SamplingOptions(**values)
        opts.validate()
        prompts = [p for p in prompts for _ in range(num_images)]
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts) or not all(isinstance(s, int) and s >= 0 for s in seed):
                raise ValueError(f"seed as a list needs one integer >= 0 per image ({len(prompts)}), got {seed}")
            seeds = list(seed)
        else:
            first = secrets.randbelow(2 ** 31) if seed is None else int(seed)
            if first < 0:
                raise ValueError(f"seed must be >= 0, got {seed}")
            seeds = [first + i for i in range(len(prompts))]
        return prompts, resolution, opts, seeds

    def _no_grad(self) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return stack

    def stream(self, prompt: str | list[str], resolution: int | None = None, cfg: float | None = None,
               diffusion_steps: int | None = None, use_residual: bool = True, seed: int | list[int] | None = None,
               num_images: int = 1, top_k: int | list[int] | None = None, top_p: float | None = None,
               temperature: float | None = None, more_smooth: bool | None = None,
               residual_temperature: float | None = None, residual_cfg: float | None = None,
               coarse_scales: int | None = None, coarse_remainder: bool | None = None, previews: bool = True,
               decode_discrete: bool = True) -> Iterator[tuple[int, list[Image.Image]] | GenerationResult]:
        """Yield (scale index, decoded preview images) after every scale, then the result.

        decode_discrete=False skips the second decoder pass (the discrete-only image beside the
        hybrid one) when the residual head runs: one decode instead of two."""
        prompts, resolution, opts, seeds = self._prepare(
            prompt, resolution, num_images, seed,
            dict(cfg=cfg, diffusion_steps=diffusion_steps, use_residual=use_residual, top_k=top_k,
                 top_p=top_p, temperature=temperature, more_smooth=more_smooth,
                 residual_temperature=residual_temperature, residual_cfg=residual_cfg, coarse_scales=coarse_scales,
                 coarse_remainder=coarse_remainder))
        # one generator per image, seeded seed, seed + 1, ...: each image is the one its seed
        # gives alone, whatever else is in the batch
        generator = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        timings = {}
        # grad mode and autocast are thread-local, and a caller (e.g. gradio) may resume this
        # generator on another thread: enter them around each piece of work, never across a yield
        start = time.perf_counter()
        with self._no_grad():
            states, _, positions = self.text_encoder(prompts)
        timings["text"] = time.perf_counter() - start
        states, positions = states.to(self.device), positions.to(self.device)
        given = remainder = None
        if opts.coarse_scales and resolution != self.default_resolution:
            schedule = self.schedules[resolution]
            if opts.coarse_scales > len(schedule):
                raise ValueError(f"coarse_scales {opts.coarse_scales}: the {resolution} px schedule has only "
                                 f"{len(schedule)} scales")
            if opts.coarse_remainder and opts.coarse_scales < len(schedule):
                raise ValueError(f"coarse_remainder needs every scale of the {resolution} px schedule taken from "
                                 f"the {self.default_resolution} px image (coarse_scales {len(schedule)})")
            t_coarse = time.perf_counter()
            with self._no_grad():
                given, remainder = self._coarse_scales(states, positions, resolution, opts, generator)
            timings["coarse"] = time.perf_counter() - t_coarse
        t_tokens = time.perf_counter()
        steps = iter_sample(self.transformer, self.tokenizer, states, positions, self.schedules[resolution], opts,
                            generator, given=given)
        preview_time = 0.0
        while True:
            with self._no_grad():
                item = next(steps)
                if isinstance(item, SampleOutput):
                    break
                if not previews:
                    continue
                t_prev = time.perf_counter()
                images = to_pil(self.tokenizer.decode(item[1]))
                preview_time += time.perf_counter() - t_prev
            yield item[0], images
        output = item
        timings["ar"] = time.perf_counter() - t_tokens - preview_time
        t_head = time.perf_counter()
        if opts.use_residual:
            with self._no_grad():
                output.residual = sample_residual(self.transformer, output, opts, generator)
                if remainder is not None:
                    output.residual = output.residual + remainder.to(output.residual.dtype)
        timings["diffusion"] = time.perf_counter() - t_head
        t_dec = time.perf_counter()
        with self._no_grad():
            # decoded separately (not as one batch) so the discrete image is bit-identical
            # whether or not the residual head runs
            hybrid = discrete = None
            if output.residual is None or decode_discrete:
                discrete = self.tokenizer.decode(output.fhat_discrete)
            if output.residual is not None:
                hybrid = self.tokenizer.decode(output.fhat_discrete, output.residual)
        timings["decode"] = time.perf_counter() - t_dec
        timings["total"] = time.perf_counter() - start - preview_time  # includes "coarse" when it ran
        discrete_images = to_pil(discrete) if discrete is not None else []
        yield GenerationResult(images=to_pil(hybrid) if hybrid is not None else discrete_images,
                               discrete_images=discrete_images,
                               seed=seeds[0], seeds=seeds, resolution=resolution, timings=timings)

    def _coarse_scales(self, states, positions, resolution: int, opts: SamplingOptions,
                       generator) -> tuple[list, torch.Tensor | None]:
        """Indices of the first `opts.coarse_scales` scales at `resolution`: a whole generation at
        the lowest resolution (drawing from the same generators first; with the residual head when
        `opts.use_residual`), decoded, upsampled bicubically and encoded at `resolution`; and, with
        `opts.coarse_remainder`, the continuous remainder of that encoding (else None)."""
        low = self.default_resolution
        tokens = sample(self.transformer, self.tokenizer, states, positions, self.schedules[low],
                        replace(opts, coarse_scales=0), generator)
        image = self.tokenizer.decode(tokens.fhat_discrete, tokens.residual)
        schedule = self.schedules[resolution]
        indices, remainder = self.tokenizer.encode_upsampled(image, schedule,
                                                             self.transformer.continuous_last(schedule))
        return indices[:opts.coarse_scales], remainder if opts.coarse_remainder else None

    def __call__(self, prompt: str | list[str], **kwargs) -> GenerationResult:
        for item in self.stream(prompt, previews=False, **kwargs):
            pass
        return item


def write_pipeline(path: str | Path, tokenizer: HybridTokenizer, transformer: HARTTransformer, text_encoder: dict,
                   resolutions: dict[int, tuple[int, ...]], sampling: dict, name: str,
                   dtype: torch.dtype | None = None, text_encoder_weights: dict | None = None) -> None:
    """Write a pipeline folder; weights as safetensors (optionally cast, e.g. to fp16)."""
    path = Path(path)
    for sub, module in (("tokenizer", tokenizer), ("transformer", transformer)):
        write_json(asdict(module.config), path / sub / "config.json")
        write_weights(module.state_dict(), path / sub / "model.safetensors", dtype)
    write_json(text_encoder, path / "text_encoder" / "config.json")
    if text_encoder_weights is not None:
        write_weights(text_encoder_weights, path / "text_encoder" / "model.safetensors")
    # the index goes last: a folder with an index is complete
    write_json({"format": FORMAT, "version": 1, "name": name,
                "resolutions": {str(k): list(v) for k, v in sorted(resolutions.items())},
                "sampling": sampling}, path / "model_index.json")


def _download(repo_id: str) -> str:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise CheckpointError(f"model path not found: {repo_id}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md"])
    except Exception as err:
        raise CheckpointError(f"{repo_id} is not a local folder and could not be downloaded from the hub "
                              f"({type(err).__name__}: {err})") from err


def _official_text_encoder(text_encoder, cfg: TransformerConfig, system_prompt: str, dtype: str) -> TextEncoder:
    if isinstance(text_encoder, TextEncoder):
        return text_encoder
    if text_encoder is None:
        raise CheckpointError("an official HART checkpoint needs its Qwen2 text encoder: pass "
                              "text_encoder=<folder or hub id of Qwen2-VL-1.5B-Instruct>")
    return TextEncoder.from_config(TextEncoderConfig(kind="hf", path=str(text_encoder), max_length=cfg.context_token,
                                                     system_prompt=system_prompt, dtype=dtype))
