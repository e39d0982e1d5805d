"""Trainers: loss goes down, exact resume after SIGKILL, two-process accelerate run, token dropping; the
recipe: its smoke run packages a model that generates, and it resolves to the shipped architecture."""
from dataclasses import replace
import json
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageDraw

from hart import HARTPipeline
from hart.checkpoint import CheckpointError, read_json, read_weights
from hart.presets import get_preset
from hart.tokenizer import HybridTokenizer
from hart.transformer import HARTTransformer
from train.train_ar import ARLoss, ARTrainConfig, last_scale_keep, train as train_ar
from train.train_tokenizer import TokenizerTrainConfig, train as train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
COLORS = ["red", "green", "blue", "orange", "purple", "black", "yellow", "cyan"]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    lines = []
    for i, color in enumerate(COLORS):
        img = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(img)
        if i % 2:
            draw.ellipse([6, 6, 26, 26], fill=color)
        else:
            draw.rectangle([8, 8, 24, 24], fill=color)
        img.save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "text": f"{color} {'circle' if i % 2 else 'square'}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer(shapes_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerTrainConfig(model_preset="tiny", data=str(shapes_data), out=str(out), resolutions=(32,),
                                         batch_sizes=(4,), steps=40, warmup=5, lr=2e-3, log_every=5, eval_every=20,
                                         checkpoint_every=40, val_fraction=0.25, mixed_precision="no"))
    return out


def losses(out: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r]


def test_tokenizer_training_lowers_loss(tiny_tokenizer):
    l1 = losses(tiny_tokenizer, "l1")
    assert l1[-1] < 0.7 * l1[0]
    result = json.loads((tiny_tokenizer / "eval.json").read_text())
    assert result["psnr_hybrid"] > 10 and 0 < result["codebook_usage"] <= 1
    assert (tiny_tokenizer / "samples" / "final.png").is_file() and (tiny_tokenizer / "loss.png").is_file()


def test_tokenizer_trains_two_resolutions_in_turn(shapes_data, tmp_path):
    """Mixed-resolution steps alternate 32 and 64 px (own batch sizes); eval.json reports both
    resolutions and their token agreement; a continuous-only run draws no discrete step."""
    out = tmp_path / "mixed"
    train_tokenizer(TokenizerTrainConfig(model_preset="tiny", data=str(shapes_data), out=str(out),
                                         resolutions=(32, 64), batch_sizes=(4, 2), continuous_prob=1.0,
                                         share_quant_resi=1, steps=6, warmup=2, lr=2e-3, log_every=1,
                                         eval_every=0, checkpoint_every=6, val_fraction=0.25,
                                         mixed_precision="no"))
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "resolution" in r]
    assert [r["resolution"] for r in records[:4]] == [32, 64, 32, 64]
    assert all(r["continuous"] for r in records)
    result = json.loads((out / "eval.json").read_text())
    assert result["res64_psnr_hybrid"] > 5 and result["psnr_hybrid"] > 5
    assert set(result["agreement64"]) == {"1", "2"}  # the leading scales both schedules share
    assert all(0 <= v <= 1 for v in result["agreement64"].values())
    assert (out / "samples" / "final_64.png").is_file()
    assert json.loads((out / "tokenizer" / "config.json").read_text())["share_quant_resi"] == 1
    with pytest.raises(ValueError, match="one entry per resolution"):
        train_tokenizer(TokenizerTrainConfig(model_preset="tiny", data=str(shapes_data), resolutions=(32, 64),
                                             batch_sizes=(4,), out=str(tmp_path / "bad")))


def test_tokenizer_architecture_overrides_are_trained_and_recorded(shapes_data, tiny_tokenizer, tmp_path):
    """A wider latent warm-started from a trained tokenizer: the saved config has the new shape,
    the run's config.json records the override, and the codebook shape follows it."""
    preset_z = get_preset("tiny").tokenizer.z_channels
    cfg = TokenizerTrainConfig(model_preset="tiny", data=str(shapes_data), out=str(tmp_path / "wide"),
                               resolutions=(32,), batch_sizes=(4,), steps=2, warmup=1, log_every=1, eval_every=2, checkpoint_every=2,
                               val_fraction=0.25, mixed_precision="no", z_channels=2 * preset_z,
                               init_from=str(tiny_tokenizer / "tokenizer"), init_partial=True)
    train_tokenizer(cfg)
    saved = json.loads((tmp_path / "wide" / "tokenizer" / "config.json").read_text())
    assert saved["z_channels"] == 2 * preset_z
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["z_channels"] == 2 * preset_z
    weights = read_weights(tmp_path / "wide" / "tokenizer" / "model.safetensors")
    assert weights["quantize.embedding.weight"].shape[1] == 2 * preset_z
    with pytest.raises(ValueError, match="--init-partial true"):
        cfg.init_partial, cfg.out = False, str(tmp_path / "refused")
        train_tokenizer(cfg)



def ar_config(data, tok, out, **kw):
    base = dict(model_preset="tiny", data=str(data), tokenizer=str(tok / "tokenizer"), out=str(out), resolution=32,
                batch_size=4, steps=40, warmup=5, lr=3e-3, log_every=5, eval_every=0, checkpoint_every=40,
                diffusion_batch_mul=2, mixed_precision="no")
    base.update(kw)
    return ARTrainConfig(**base)


def test_ar_training_lowers_loss_and_saves_a_pipeline(shapes_data, tiny_tokenizer, tmp_path):
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "ar"))
    ce = losses(tmp_path / "ar", "ce")
    assert ce[-1] < 0.8 * ce[0]
    pipe = HARTPipeline.from_pretrained(tmp_path / "ar" / "model")
    assert pipe.resolutions == [32]
    result = pipe("red square", seed=0)
    assert result.images[0].size == (32, 32)
    assert (tmp_path / "ar" / "model" / "transformer" / "model_raw.safetensors").is_file()


def run_trainer(module: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_matches_uninterrupted_run(shapes_data, tmp_path):
    args = ["--preset", "tiny", "--data", str(shapes_data), "--resolutions", "32", "--batch-sizes", "4",
            "--steps", "24", "--checkpoint-every", "4", "--eval-every", "1000", "--val-fraction", "0.25",
            "--mixed-precision", "no", "--dead-code-every", "6"]
    full = run_trainer("train.train_tokenizer", args + ["--out", str(tmp_path / "full")])
    killed = run_trainer("train.train_tokenizer", args + ["--out", str(tmp_path / "killed")])
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "latest").is_file():
        time.sleep(0.05)
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert full.wait() == 0, full.stderr.read().decode()[-2000:]
    marker = (ckpts / "latest").read_text()
    assert marker.startswith("step_") and int(marker[5:]) < 24  # really interrupted
    resumed = run_trainer("train.train_tokenizer", args + ["--out", str(tmp_path / "killed")])
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    a = read_weights(tmp_path / "full" / "tokenizer" / "model.safetensors")
    b = read_weights(tmp_path / "killed" / "tokenizer" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_a_checkpoint_at_the_step_reached(shapes_data, tmp_path, sig):
    out = tmp_path / "stopped"
    args = ["--preset", "tiny", "--data", str(shapes_data), "--resolutions", "32", "--batch-sizes", "4",
            "--steps", "100000", "--checkpoint-every", "100000", "--checkpoint-minutes", "1000",
            "--eval-every", "100000", "--log-every", "1", "--val-fraction", "0.25", "--mixed-precision", "no",
            "--out", str(out)]
    proc = run_trainer("train.train_tokenizer", args)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(losses(out, "l1")) >= 3:
                break
        except (OSError, ValueError):  # not written yet, or a line half written
            pass
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    message = proc.stderr.read().decode()
    assert f"stopped by signal {int(sig)}" in message
    saved = int((out / "checkpoints" / "latest").read_text()[5:])
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= logged <= saved < 100000  # nothing since the last logged step is lost
    assert not (out / "tokenizer").exists()  # stopped, not finished: no export


def test_logged_seconds_add_up_every_process_of_a_resumed_run(tmp_path):
    """A stage stopped and resumed twice: its wall time is the sum of each process's last `time`."""
    from train.engine import logged_seconds, RunLog
    log = tmp_path / "log.jsonl"
    assert logged_seconds(log) == 0.0  # never started
    times = [(20, 10.0), (40, 20.5), (40, 3.0), (60, 12.0), (80, 2.0), (100, 4.5)]  # 3 processes
    log.write_text("".join(json.dumps({"step": step, "time": t}) + "\n" for step, t in times))
    assert len(RunLog.read(log)) == 6
    assert logged_seconds(log) == pytest.approx(20.5 + 12.0 + 4.5)


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(tmp_path):
    """The engine raises at the first NaN loss, naming the step, and the checkpoints on disk keep the
    last finite weights, so a rerun with a lower lr resumes from them."""
    from train.engine import Checkpointer, Engine, NonFiniteStep, RunConfig
    cfg = RunConfig(out=str(tmp_path / "run"), steps=10, lr=0.1, warmup=0, log_every=1, checkpoint_every=2,
                    mixed_precision="no")
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    engine = Engine(cfg, "toy")
    engine.resume(model, optimizer)
    model, optimizer = engine.prepare(model, optimizer)
    x = torch.ones(4, 2)

    def train_step(step, g):
        loss = model(x).square().mean() * (math.nan if step == 4 else 1.0)  # step 5 of 10 goes bad
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    with pytest.raises(NonFiniteStep, match="step 5.*step_00000004"):
        engine.run(train_step, optimizer, lambda: model)
    latest = Checkpointer(Path(cfg.out)).latest()
    assert latest.name == "step_00000004"
    assert all(torch.isfinite(w).all() for w in read_weights(latest / "model.safetensors").values())
    assert torch.isnan(model.weight).any()  # the bad step did reach the live weights: only the disk is safe
    # a NaN gradient with a finite loss (the update that poisons the weights) stops the run as well
    engine = Engine(replace(cfg, out=str(tmp_path / "grad")), "toy")
    with pytest.raises(NonFiniteStep, match="step 3"):
        engine.run(lambda step, g: {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(math.nan if step == 2 else 1.0)},
                   optimizer, lambda: model)


def test_resume_with_another_config_is_refused(shapes_data, tiny_tokenizer, tmp_path):
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "ar", steps=5, checkpoint_every=5))
    with pytest.raises(CheckpointError, match="batch_size"):
        train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "ar", steps=10, batch_size=2))


def test_command_line_flags_parse_optional_fields_as_their_type():
    """`--coarse-scales 7` on an `int | None` field is the integer 7, not the text "7"."""
    from train.engine import load_config
    from train.train_head import HeadTrainConfig
    cfg = load_config(HeadTrainConfig, {}, ["--coarse-scales", "7", "--continuous-last-sides", "16",
                                            "--balance-resolutions", "true", "--lr", "2e-4"])
    assert cfg.coarse_scales == 7 and isinstance(cfg.coarse_scales, int)
    assert cfg.continuous_last_sides == (16,) and cfg.balance_resolutions is True and cfg.lr == 2e-4
    with pytest.raises(SystemExit):
        load_config(HeadTrainConfig, {}, ["--coarse-scales", "seven"])


def test_two_process_accelerate_run_keeps_weights_identical(shapes_data, tiny_tokenizer, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "train.train_ar", "--preset", "tiny", "--data", str(shapes_data),
           "--tokenizer", str(tiny_tokenizer / "tokenizer"), "--out", str(out), "--steps", "6",
           "--batch-size", "2", "--mixed-precision", "no", "--eval-every", "1000", "--diffusion-batch-mul", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checksums = json.loads((out / "process_checksums.json").read_text())["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (out / "model" / "model_index.json").is_file()


def test_token_dropping_feeds_the_expected_tokens():
    gen = torch.Generator().manual_seed(0)
    counts = [last_scale_keep(3, 256, 16, gen).shape[1] for _ in range(400)]
    ratios = [1 - c / 256 for c in counts]
    assert min(counts) >= 16 and max(counts) <= 128  # mask ratio within [0.5, 1]
    assert 0.78 < sum(ratios) / len(ratios) < 0.86  # truncated normal mean ~0.82
    keep = last_scale_keep(2, 64, 16, gen)
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted, no repeats

    preset = get_preset("tiny")
    tf, tok = HARTTransformer(preset.transformer), HybridTokenizer(preset.tokenizer)
    sizes = preset.resolutions[64]
    module = ARLoss(tf, tok, ARTrainConfig(diffusion_batch_mul=3))
    seen = {}
    tf.diffloss.loss = lambda target, z, timesteps=None, generator=None: (seen.update(n=target.shape[0])
                                                                          or target.sum() * 0)
    L = sum(s * s for s in sizes)
    keep = torch.stack([torch.randperm(64)[:20].sort().values for _ in range(2)])
    loss, *_ = module(torch.randn(2, 16, 32), torch.arange(16).expand(2, -1), torch.randn(2, L - 1, 8),
                      torch.randint(0, 64, (2, L)), torch.randn(2, 64, 8), sizes, keep, gen)
    assert seen["n"] == 2 * 20 * 3  # kept last-scale tokens x batch x diffusion_batch_mul
    assert torch.isfinite(loss)


@pytest.mark.parametrize("overrides, message", [
    (dict(resolution=30), "no scale schedule"),
    (dict(data="does/not/exist"), "not found"),
    (dict(replay_every=2), "replay-resolution"),
])
def test_bad_training_input(shapes_data, tiny_tokenizer, tmp_path, overrides, message):
    data = overrides.pop("data", shapes_data)
    cfg = ar_config(data, tiny_tokenizer, tmp_path / "bad", **overrides)
    with pytest.raises(ValueError, match=message):
        train_ar(cfg)


def test_stage_two_replays_the_stage_one_resolution(shapes_data, tiny_tokenizer, tmp_path, monkeypatch):
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "s1", steps=6, checkpoint_every=6))
    seen = []
    forward = ARLoss.forward

    def spy(self, states, positions, inputs, targets, rest, scales, keep, generator):
        seen.append((tuple(scales), keep is None))
        return forward(self, states, positions, inputs, targets, rest, scales, keep, generator)
    monkeypatch.setattr(ARLoss, "forward", spy)
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "s2", resolution=64, steps=7, checkpoint_every=7,
                       init_from=str(tmp_path / "s1" / "model"), drop_last_scale=True, drop_min_keep=4,
                       replay_resolution=32, replay_every=3, log_every=2, resolution_embed=True,
                       first_token_weight=8.0))
    # every third step trains at 32 px on all its tokens; the others at 64 px with dropping
    assert seen == [((1, 2, 3, 4), True) if i % 3 == 0 else ((1, 2, 4, 6, 8), False) for i in range(7)]
    # a log line reports the replay steps' accuracy only when replay steps ran since the previous line
    lines = [json.loads(line) for line in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert [("replay_acc" in line) for line in lines] == [True, True, False]  # replay steps 0 and 3
    assert all(0.0 <= line["replay_acc"] <= 1.0 for line in lines[:2])
    pipe = HARTPipeline.from_pretrained(tmp_path / "s2" / "model")
    assert pipe.resolutions == [32, 64]
    # stage 1 had no resolution vectors: they start at zero and train, one per resolution
    assert pipe.transformer.config.resolution_sides == (4, 8)
    vectors = pipe.transformer.resolution_embed.detach()
    assert vectors.shape[0] == 2 and (vectors.abs().amax(1) > 0).all()
    assert pipe("red square", resolution=32, seed=0).images[0].size == (32, 32)


def test_deepened_head_starts_as_the_same_function():
    from hart.diffusion import ResidualDiffusionHead
    from train.train_head import deepen
    torch.manual_seed(0)
    head = ResidualDiffusionHead(token_dim=4, cond_dim=8, width=16, depth=2)
    for p in head.parameters():  # a "trained" head: no zero modulation left
        torch.nn.init.normal_(p, std=0.1)
    grown = deepen(head, 4)
    assert len(grown.net.res_blocks) == 4
    z = torch.randn(5, 8)
    same = [h.sample(z, steps=4, generator=torch.Generator().manual_seed(1)) for h in (head, grown)]
    assert torch.allclose(same[0], same[1], atol=1e-6)
    with pytest.raises(ValueError, match="below"):
        deepen(head, 1)


def test_widened_head_starts_as_the_same_function():
    from hart.diffusion import ResidualDiffusionHead
    from train.train_head import widen
    torch.manual_seed(0)
    head = ResidualDiffusionHead(token_dim=4, cond_dim=8, width=16, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    grown = widen(head, 40)
    assert [block.mlp[0].out_features for block in grown.net.res_blocks] == [40, 40]
    assert grown.net.res_blocks[0].mlp[0].weight[16:].abs().sum() > 0  # new units are not dead
    z = torch.randn(5, 8)
    same = [h.sample(z, steps=4, generator=torch.Generator().manual_seed(1)) for h in (head, grown)]
    assert torch.allclose(same[0], same[1], atol=1e-6)
    with pytest.raises(ValueError, match="below"):
        widen(head, 8)
    with pytest.raises(ValueError, match="hidden width"):
        ResidualDiffusionHead(token_dim=4, cond_dim=8, width=16, depth=2, hidden=-1)


def test_head_context_sees_only_the_neighbours_and_training_builds_it_the_same_way():
    from hart.diffusion import ResidualDiffusionHead
    from train.train_head import neighbour_table, with_context
    torch.manual_seed(0)
    plain = ResidualDiffusionHead(token_dim=4, cond_dim=6, width=16, depth=2)
    head = with_context(plain, 3)
    grid = torch.randn(2, 16, 6)  # two 4x4 grids of conditions
    assert torch.equal(head.contextualize(grid), grid)  # zero at first: the plain head's function
    torch.nn.init.normal_(head.context.weight)
    torch.nn.init.normal_(head.context.bias)
    out = head.contextualize(grid)
    near, far = grid.clone(), grid.clone()
    near[0, 5] += 1   # (1, 1): a neighbour of (0, 0)
    far[0, 15] += 1   # (3, 3): not one
    assert not torch.allclose(head.contextualize(near)[0, 0], out[0, 0])
    assert torch.allclose(head.contextualize(far)[0, 0], out[0, 0])
    assert torch.equal(head.contextualize(far)[1], out[1])  # images stay apart
    # train_head draws scattered tokens from pools of several grid sizes: the same conditions
    other = torch.randn(3, 9, 6)  # three 3x3 grids after them
    pool = torch.cat([grid.flatten(0, 1), other.flatten(0, 1)])
    table, inside = neighbour_table([(2, 4), (3, 3)], 3)
    scattered = head.contextualize_neighbours(pool, pool[table] * inside[..., None])
    assert torch.allclose(scattered, torch.cat([out.flatten(0, 1), head.contextualize(other).flatten(0, 1)]),
                          atol=1e-5)
    with pytest.raises(ValueError, match="square grid"):
        head.contextualize(torch.randn(1, 10, 6))
    with pytest.raises(ValueError, match="odd size"):
        ResidualDiffusionHead(token_dim=4, cond_dim=6, width=16, depth=2, context_kernel=2)
    with pytest.raises(ValueError, match="already has"):
        with_context(head, 5)


def test_head_training_changes_only_the_head_and_resumes(shapes_data, tiny_tokenizer, tmp_path):
    from train.train_head import HeadTrainConfig, train as train_head
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "ar", steps=6, checkpoint_every=6))
    source = tmp_path / "ar" / "model"
    cfg = HeadTrainConfig(model=str(source), data=str(shapes_data), out=str(tmp_path / "head"), diff_depth=3,
                          residual_scale=0.15, batch_tokens=256, lr=3e-3, warmup=5, steps=40, log_every=20,
                          eval_tokens=512, mixed_precision="no")
    train_head(replace(cfg, max_minutes=1e-9))  # stops after its first step, with a checkpoint
    assert (tmp_path / "head" / "checkpoints" / "step_00000001").is_dir()
    train_head(cfg)
    lines = [json.loads(line) for line in (tmp_path / "head" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 20, 40]  # resumed: no second start line
    assert lines[-1]["explained"] > lines[0]["explained"]
    assert len(list((tmp_path / "head" / "cache").glob("head_32_*.safetensors"))) == 1  # built once
    before = read_weights(source / "transformer" / "model.safetensors")
    after = read_weights(tmp_path / "head" / "model" / "transformer" / "model.safetensors")
    assert set(after) - set(before) == {k.replace("res_blocks.1.", "res_blocks.2.") for k in before
                                        if k.startswith("diffloss.net.res_blocks.1.")}
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert changed and all(k.startswith("diffloss.") for k in changed)
    pipe = HARTPipeline.from_pretrained(tmp_path / "head" / "model")
    assert pipe.transformer.config.diff_depth == 3 and pipe.transformer.diffloss.residual_scale == 0.15
    assert pipe("red square", resolution=32, seed=0).images[0].size == (32, 32)
    # the head was retrained in new units; a warm start from that model keeps them
    assert read_json(source / "transformer" / "config.json")["residual_scale"] == 0.6
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "again", steps=2, checkpoint_every=2,
                       init_from=str(tmp_path / "head" / "model")))
    assert read_json(tmp_path / "again" / "model" / "transformer" / "config.json")["residual_scale"] == 0.15
    # another width: a new head of that shape, and nothing else changed
    train_head(replace(cfg, out=str(tmp_path / "wide"), diff_width=48, diff_depth=0, steps=2))
    wide = HARTPipeline.from_pretrained(tmp_path / "wide" / "model").transformer
    assert (wide.config.diff_width, wide.config.diff_depth) == (48, 2)
    assert wide.diffloss.net.input_proj.out_features == 48
    # a wider inner layer: kept in the config, and the model loads with it
    train_head(replace(cfg, model=str(tmp_path / "head" / "model"), out=str(tmp_path / "hidden"), diff_depth=0,
                       diff_hidden=80, steps=2))
    hidden = HARTPipeline.from_pretrained(tmp_path / "hidden" / "model").transformer
    assert (hidden.config.diff_hidden, hidden.config.diff_depth) == (80, 3)
    assert hidden.diffloss.net.res_blocks[2].mlp[2].in_features == 80
    # the unrolled-chain term, low timesteps and balanced pools train too
    train_head(replace(cfg, out=str(tmp_path / "unrolled"), unrolled_weight=1.0, balance_resolutions=True,
                       low_timestep_share=0.9, low_timestep_max=300, steps=20))
    lines = [json.loads(line) for line in (tmp_path / "unrolled" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 20] and math.isfinite(lines[-1]["loss"])
    # a context convolution: trained from zero on the same cache, saved, and used by the sampler
    train_head(replace(cfg, out=str(tmp_path / "context"), cache=str(tmp_path / "head" / "cache"), head_context=3,
                       steps=20))
    assert len(list((tmp_path / "head" / "cache").glob("head_32_*.safetensors"))) == 1  # the raw conditions
    context = HARTPipeline.from_pretrained(tmp_path / "context" / "model")
    assert context.transformer.config.head_context == 3
    assert context.transformer.diffloss.context.weight.abs().sum() > 0
    images = [context("red square", resolution=32, seed=0).images[0] for _ in range(2)]
    assert images[0].tobytes() == images[1].tobytes()
    # the head takes over the last scale: its targets are all the coarser scales leave, cached apart
    train_head(replace(cfg, out=str(tmp_path / "continuous"), cache=str(tmp_path / "head" / "cache"),
                       continuous_last_sides=(4,), steps=2))
    assert len(list((tmp_path / "head" / "cache").glob("head_32_*.safetensors"))) == 2
    continuous = HARTPipeline.from_pretrained(tmp_path / "continuous" / "model")
    assert continuous.transformer.config.continuous_last_sides == (4,)
    out = continuous("red square", resolution=32, seed=0, use_residual=False)
    assert out.images[0].size == (32, 32)
    with pytest.raises(ValueError, match="--model"):
        train_head(HeadTrainConfig())
    with pytest.raises(ValueError, match="--unrolled-weight"):
        train_head(replace(cfg, unrolled_weight=-1.0))


def test_balanced_token_picks_draw_every_pool_equally():
    from train.train_head import pick_tokens
    ends = torch.tensor([100, 500])  # pool 0: tokens 0-99, pool 1: tokens 100-499
    picked = pick_tokens(ends, 20000, True, torch.Generator().manual_seed(0))
    small = picked < 100
    assert picked.min() >= 0 and picked.max() < 500
    assert abs(small.float().mean().item() - 0.5) < 0.02  # uniform would give 0.2
    assert len(picked[small].unique()) == 100 and len(picked[~small].unique()) == 400
    uniform = pick_tokens(ends, 20000, False, torch.Generator().manual_seed(0))
    assert abs((uniform < 100).float().mean().item() - 0.2) < 0.02


def test_evaluate_reports_every_metric(shapes_data, tiny_tokenizer, tmp_path):
    from train.evaluate import evaluate
    train_ar(ar_config(shapes_data, tiny_tokenizer, tmp_path / "ar", steps=10, checkpoint_every=10))
    model = tmp_path / "ar" / "model"
    report = evaluate(str(model), str(shapes_data), count=8, cfgs=(0.0, 2.0), top_ks=(0, 3),
                      temperatures=(1.0, 0.5), residual_temperatures=(1.0, 0.0), sweep_count=4, val_fraction=0.25,
                      choose_defaults=True)
    entry = report["resolutions"]["32"]
    assert set(entry["tokenizer"]) >= {"psnr_discrete", "psnr_hybrid", "ssim_discrete", "ssim_hybrid"}
    assert 0 <= entry["tokenizer"]["recon_top1_discrete"] <= 1 and 0 <= entry["tokenizer"]["recon_top1_hybrid"] <= 1
    for name in ("exact", "paraphrase"):
        for kind in ("hybrid", "discrete"):
            metrics = entry["generation"][name][kind]
            assert 0 <= metrics["top1"] <= metrics["top5"] <= 1 and metrics["mean_nn_distance"] > 0
    assert entry["latency_s"] > 0
    check = entry["residual_head_teacher_forced"]
    assert check["images"] == 8 and check["residual_variance_explained"] <= 1
    assert all(math.isfinite(check[k]) for k in ("true_residual_gain_db", "predicted_residual_gain_db"))
    rows = report["sweep"]["rows"]
    assert [(row["cfg"], row["top_k"]) for row in rows[:2]] == [(0.0, 0), (2.0, 0)]
    assert len(rows) == 6 and rows[2]["top_k"] == 3 and all(0 <= row["score"] <= 1 for row in rows)
    best = max(rows[:3], key=lambda row: row["score"])
    # then the token temperature at the best cfg / top-k, by retrieval too
    assert rows[3] == dict(rows[3], cfg=best["cfg"], top_k=best["top_k"], temperature=0.5)
    best = max((best, rows[3]), key=lambda row: row["score"])

    def gain(row):
        return -1e9 if row["residual_gain_db"] is None else row["residual_gain_db"]
    # then the residual temperature at the best tokens setting, chosen by residual gain
    assert rows[4] == dict(rows[4], cfg=best["cfg"], top_k=best["top_k"], temperature=best["temperature"],
                           residual_temperature=0.0)
    temp = max((best, rows[4]), key=gain)["residual_temperature"]
    # last, the head's guidance (None: the last scale's cfg) at that temperature
    assert rows[5] == dict(rows[5], cfg=best["cfg"], top_k=best["top_k"], temperature=best["temperature"],
                           residual_temperature=temp, residual_cfg=0.0)
    at_temp = next(row for row in (best, rows[4]) if row["residual_temperature"] == temp)
    assert at_temp["residual_cfg"] is None
    head_cfg = max((at_temp, rows[5]), key=gain)["residual_cfg"]
    chosen = {"cfg": best["cfg"], "top_k": best["top_k"], "temperature": best["temperature"],
              "residual_temperature": temp, "residual_cfg": head_cfg}
    assert report["sweep"]["best"] == chosen
    # the chosen setting is the model's default from now on, and the report used it
    stored = json.loads((model / "model_index.json").read_text())["sampling"]
    assert {key: stored[key] for key in chosen} == chosen
    assert {key: report["sampling_defaults"][key] for key in chosen} == chosen


def test_evaluate_a_bare_tokenizer_at_every_resolution(shapes_data, tiny_tokenizer, tmp_path):
    from train.evaluate import main
    out = tmp_path / "tok.json"
    assert main(["--tokenizer", str(tiny_tokenizer / "tokenizer"), "--data", str(shapes_data), "--preset", "tiny",
                 "--val-fraction", "0.25", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["resolutions"]
    assert sorted(report, key=int) == [str(r) for r in sorted(get_preset("tiny").resolutions)]
    trained = json.loads((tiny_tokenizer / "eval.json").read_text())  # same split, same schedule at 32 px
    assert report["32"]["psnr_hybrid"] == pytest.approx(trained["psnr_hybrid"], abs=1e-3)
    assert report["32"]["psnr_discrete"] == pytest.approx(trained["psnr_discrete"], abs=1e-3)


def test_compare_reports_flags_each_worse_row(tmp_path):
    """The ship gate: a retrained model's report against the shipped one, row by row; lower latency and
    nearest-neighbour distance are better, sweep rows and counts are not compared."""
    from train.evaluate import compare_reports, main
    old = {"model": "a", "sweep": {"rows": [1]}, "resolutions": {"64": {
        "latency_s": 0.10, "generation": {"exact": {"hybrid": {"top1": 0.9, "mean_nn_distance": 6.0},
                                                   "residual_gain_db": 1.2, "correct_for_gain": 270}}}}}
    new = json.loads(json.dumps(old))
    entry = new["resolutions"]["64"]
    entry["latency_s"], entry["generation"]["exact"]["hybrid"]["mean_nn_distance"] = 0.09, 5.0
    entry["generation"]["exact"]["correct_for_gain"] = 1
    rows = compare_reports(new, old)
    assert [r["row"] for r in rows] == ["resolutions.64.latency_s", "resolutions.64.generation.exact.hybrid.top1",
                                        "resolutions.64.generation.exact.hybrid.mean_nn_distance",
                                        "resolutions.64.generation.exact.residual_gain_db"]
    assert all(r["at_least_as_good"] for r in rows)
    entry["generation"]["exact"]["residual_gain_db"], entry["latency_s"] = 1.1, 0.2
    worse = [r["row"] for r in compare_reports(new, old) if not r["at_least_as_good"]]
    assert worse == ["resolutions.64.latency_s", "resolutions.64.generation.exact.residual_gain_db"]
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["--compare", str(tmp_path / "new.json"), str(tmp_path / "old.json")]) == 1
    assert main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0


def test_sample_grid_has_a_discrete_and_a_hybrid_column_per_resolution():
    from hart.pipeline import HARTPipeline
    from train.samples import sample_grid
    pipe = HARTPipeline.from_preset("tiny")
    resolutions = pipe.resolutions[:2]
    grid = sample_grid(pipe, ["red apple", "rocket"], resolutions, cell=32, label_width=50)
    assert grid.size == (50 + 2 * len(resolutions) * 32, 24 + 2 * 32)
    # the first prompt's hybrid cell is the pipeline's image for that prompt and seed, upscaled
    res = resolutions[0]
    expected = pipe(["red apple", "rocket"], resolution=res, seed=0).images[0].resize((32, 32), 0)
    assert grid.crop((50 + 32, 24, 50 + 64, 56)).tobytes() == expected.tobytes()


def test_package_swaps_a_finetuned_decoder_but_refuses_a_changed_encoder(tmp_path):
    from dataclasses import asdict
    from hart.checkpoint import write_json, write_weights
    from train.package import main as package
    pipe = HARTPipeline.from_preset("tiny")
    pipe.save_pretrained(tmp_path / "ar")
    state = {k: v.clone() for k, v in pipe.tokenizer.state_dict().items()}
    decoder_key = next(k for k in state if k.startswith("decoder.") and k.endswith("weight"))
    state[decoder_key] += 0.5
    for name, changed in (("dec", state), ("enc", {**state, "encoder.conv_in.weight": state["encoder.conv_in.weight"] + 0.5})):
        write_json(asdict(pipe.tokenizer.config), tmp_path / name / "config.json")
        write_weights(changed, tmp_path / name / "model.safetensors")
    assert package(["--model", str(tmp_path / "ar"), "--tokenizer", str(tmp_path / "dec"), "--name", "shipped",
                    "--out", str(tmp_path / "out")]) == 0
    shipped = HARTPipeline.from_pretrained(tmp_path / "out")
    assert shipped.name == "shipped"
    loaded = shipped.tokenizer.state_dict()
    assert loaded[decoder_key].dtype == torch.float32  # fp16 on disk, upcast on load
    assert torch.allclose(loaded[decoder_key], state[decoder_key], atol=1e-3)
    assert (tmp_path / "out" / "tokenizer" / "model.safetensors").stat().st_size < \
        (tmp_path / "ar" / "tokenizer" / "model.safetensors").stat().st_size  # fp16
    with pytest.raises(CheckpointError, match="changes how images become tokens"):
        package(["--model", str(tmp_path / "ar"), "--tokenizer", str(tmp_path / "enc"), "--out", str(tmp_path / "x")])
    # any config change is refused, even one that leaves the token side's shapes alone
    other = replace(pipe.tokenizer.config, dropout=0.1)
    write_json(asdict(other), tmp_path / "other" / "config.json")
    write_weights(state, tmp_path / "other" / "model.safetensors")
    with pytest.raises(CheckpointError, match="config differs"):
        package(["--model", str(tmp_path / "ar"), "--tokenizer", str(tmp_path / "other"), "--out", str(tmp_path / "y")])


def test_unrolled_chain_loss_is_the_deterministic_samples_error_and_trains_it():
    from hart.diffusion import ResidualDiffusionHead
    from train.train_head import unrolled_chain_loss
    torch.manual_seed(0)
    head = ResidualDiffusionHead(token_dim=4, cond_dim=16, width=32, depth=2, residual_scale=0.3)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    z, target = torch.randn(64, 16), 0.1 * torch.randn(64, 4)
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    with torch.no_grad():
        sample = head.sample(z, steps=4, temperature=0.0, generator=seeded())
    loss = unrolled_chain_loss(head, target, z, steps=4, generator=seeded())
    torch.testing.assert_close(loss.detach(), (sample - target).square().mean() / 0.3 ** 2)
    loss.backward()  # the gradient reaches the blocks through every step of the chain
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.net.res_blocks.parameters())
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        unrolled_chain_loss(head, target, z, steps=4, generator=seeded()).backward()
        optimizer.step()
    assert unrolled_chain_loss(head, target, z, steps=4, generator=seeded()) < 0.2 * loss.detach()


def test_low_timesteps_draw_the_asked_share_below_the_limit():
    from train.train_head import low_timesteps
    t = low_timesteps(20000, 0.9, 300, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1000
    assert abs((t < 300).float().mean().item() - (0.9 + 0.1 * 0.3)) < 0.01
    with pytest.raises(ValueError, match="low-timestep"):
        low_timesteps(4, 1.5, 300, torch.Generator())


RECIPE = "hart-emoji"
CANDIDATE = "hart-emoji-v2"   # the retrain that replaces the shipped model once it measures at least as well
BUNDLED = ROOT / "assets" / "hart-emoji"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


@pytest.mark.parametrize("recipe", [RECIPE, CANDIDATE])
def test_the_recipe_resolves_to_the_shipped_architecture(recipe):
    """train/configs/<recipe>, applied stage by stage with each trainer's config rules, gives the
    bundled model's tokenizer and transformer configs and resolutions; the preset is that architecture."""
    from dataclasses import asdict
    from train.recipe import load_recipe, resolve_architecture
    resolved = json.loads(json.dumps(resolve_architecture(load_recipe(recipe))))
    assert resolved["tokenizer"] == read_json(BUNDLED / "tokenizer" / "config.json")
    assert resolved["transformer"] == read_json(BUNDLED / "transformer" / "config.json")
    assert resolved["resolutions"] == read_json(BUNDLED / "model_index.json")["resolutions"]
    preset = get_preset("emoji")
    assert json.loads(json.dumps(asdict(preset.tokenizer))) == resolved["tokenizer"]
    assert json.loads(json.dumps(asdict(preset.transformer))) == resolved["transformer"]
    # --smoke changes step counts and data, never the architecture
    smoke = json.loads(json.dumps(resolve_architecture(load_recipe(recipe, smoke=True))))
    assert smoke == resolved


def test_the_bundled_model_records_its_recipe():
    from train.recipe import recipe_record
    record = read_json(BUNDLED / "recipe.json")
    assert record == recipe_record(RECIPE)
    assert [stage["name"] for stage in record["stages"]] == [
        "dataset", "tokenizer", "tokenizer-continuous", "tokenizer-mixed", "ar64", "ar128", "ar128-first-token",
        "head", "head-finetune", "head-continuous-last", "head-coarse-scales", "head-low-codes", "head-context",
        "head-low-latent", "package", "evaluate"]


@pytest.mark.skipif(not EMOJI_FONT.exists(), reason=f"emoji font not installed: {EMOJI_FONT}")
@pytest.mark.parametrize("recipe", [RECIPE, CANDIDATE])
def test_smoke_recipe_packages_a_model_that_generates(tmp_path, recipe):
    """`python -m train.recipe <recipe> --smoke` runs every stage (8 emoji, 2 steps each) into one
    folder; the packaged model has the shipped architecture, its recipe and eval.json, and generates.
    Rerunning the command skips every finished stage."""
    out = tmp_path / "recipe"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "train.recipe", recipe, "--out", str(out), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = out / "model"
    for part in ("tokenizer", "transformer"):
        assert read_json(model / part / "config.json") == read_json(BUNDLED / part / "config.json")
    index = read_json(model / "model_index.json")
    assert index["resolutions"] == read_json(BUNDLED / "model_index.json")["resolutions"]
    assert index["name"] == "hart-emoji"
    record = read_json(model / "recipe.json")
    assert record["recipe"] == recipe and record["smoke"] is True
    report = read_json(model / "eval.json")
    assert set(report["resolutions"]) == {"64", "128"}
    assert index["sampling"] == {**index["sampling"], **report["sweep"]["best"]}  # the sweep's choice is stored
    # a head stage's coarse_scales is built into its training data and kept as the sampling default
    from train.recipe import load_recipe
    coarse = [s.config.coarse_scales for s in load_recipe(recipe) if s.kind == "head" and s.config.coarse_scales is not None]
    assert index["sampling"]["coarse_scales"] == (coarse[-1] if coarse else 0)
    pipe = HARTPipeline.from_pretrained(model)
    image = pipe("red apple", resolution=128, seed=0).images[0]
    assert image.size == (128, 128)
    from train.recipe import run
    assert set(run(recipe, out, smoke=True).values()) == {0.0}  # every stage finished: nothing reruns
