"""The benchmark suite cannot rot: a tiny end-to-end run of bench/run.py whose JSON must hold
every reported ratio as a finite positive number, the stored results still rendering, plus the
DiT baseline's sizing and shapes and the attention probe's chunked kernel."""
from __future__ import annotations

import json
import math
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from bench.dit import DDIMSampler, DiT, count_params, hart_param_count, match_hart
from hart.presets import get_preset
from hart.transformer import HARTTransformer

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ DiT baseline

@pytest.mark.parametrize("preset", ["tiny", "emoji"])
def test_dit_parameter_count_matches_hart(preset):
    tf = get_preset(preset).transformer
    cfg = match_hart(tf)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (tf.embed_dim, tf.depth, tf.num_heads)
    assert (cfg.token_dim, cfg.context_dim) == (tf.token_dim, tf.context_dim)
    with torch.device("meta"):
        dit_params = count_params(DiT(cfg))
    hart_params = hart_param_count(tf)
    assert abs(dit_params - hart_params) / hart_params < 0.02, (dit_params, hart_params)


def test_dit_count_on_meta_equals_real_build():
    tf = get_preset("tiny").transformer
    cfg = match_hart(tf)
    assert count_params(DiT(cfg)) == count_params(DiT(cfg).to("meta"))
    assert hart_param_count(tf) == count_params(HARTTransformer(tf))


def test_dit_block_modulation_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="already has"):
        match_hart(get_preset("tiny").transformer, modulation="block")


@pytest.mark.parametrize("modulation", ["single", "block"])
def test_dit_forward_and_sampling_shapes(modulation):
    tf = get_preset("emoji").transformer if modulation == "block" else get_preset("tiny").transformer
    if modulation == "block":  # a narrow copy of the emoji shapes, so the test stays fast
        tf.embed_dim, tf.depth, tf.num_heads, tf.mlp_hidden, tf.diff_width = 64, 2, 4, 256, 64
    cfg = match_hart(tf, modulation=modulation)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    for side in (4, 6):  # one set of weights, any latent grid
        x = torch.randn(3, cfg.token_dim, side, side)
        t = torch.tensor([0, 500, 999])
        context = torch.randn(3, 16, cfg.context_dim)
        out = dit(x, t, context)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
    sampler = DDIMSampler(dit, steps=3, cfg=3.0)
    rows = sampler.rows(context)
    assert rows["pooled"].shape == (6, cfg.embed_dim)  # batched cond + uncond
    head_dim = cfg.embed_dim // cfg.num_heads
    assert len(rows["kv"]) == cfg.depth and rows["kv"][0][0].shape == (6, cfg.num_heads, 16, head_dim)
    latent = sampler.sample(context, side=5, generator=torch.Generator().manual_seed(0))
    assert latent.shape == (3, cfg.token_dim, 5, 5)
    assert torch.isfinite(latent).all()


def test_dit_output_depends_on_text_once_trained():
    """Zero-initialised gates make a fresh DiT ignore its input; perturbed weights must not."""
    cfg = match_hart(get_preset("tiny").transformer)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(1, cfg.token_dim, 4, 4), torch.tensor([10])
    context = torch.randn(1, 16, cfg.context_dim)
    a = dit(x, t, context)
    b = dit(x, t, torch.randn(1, 16, cfg.context_dim))
    assert not torch.allclose(a, b)
    # the per-sample text cache the sampler uses gives the same output as the states themselves
    torch.testing.assert_close(dit(x, t, text=dit.encode_text(context)), a)


# ------------------------------------------------------------------ end-to-end run

def _positive(value, where: str) -> None:
    if isinstance(value, dict):
        value = value["median"]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "bench/run.py", "--quick", "--tiny", "--repeats", "1", "--threads", "1",
           "--in-process", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_tiny_run_has_every_section_and_ratio(tiny_run):
    data, _ = tiny_run
    assert data["schema"] == "hart-bench/1"
    for section in ("machine", "peak_matmul", "generation", "vs_diffusion", "vs_limit", "residual_head",
                    "decode_layout", "training"):
        assert section in data, section
    settings = data["settings"]
    assert settings["quick"] and settings["tiny"] and settings["repeats"] == 1
    assert any("< 5" in note for note in settings["notes"])  # fewer repeats are declared
    if not settings["bf16_native"]:  # bf16 generation is skipped, and the run says why
        assert settings["precisions"] == ["fp32"]
        assert any("bf16 generation not run" in note for note in settings["notes"])

    machine = data["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1
    assert machine["cpu_model"] and machine["usable_cpus"] >= 1

    peak = data["peak_matmul"]
    _positive(peak["fp32"]["peak_gflops"], "fp32 peak")
    _positive(peak["bf16"]["peak_gflops"], "bf16 peak")
    for n, ratio in peak["bf16_over_fp32_side_by_side"].items():
        _positive(ratio, f"bf16/fp32 at {n}")

    gen = data["generation"]
    assert "skipped" in gen["full_size"]
    cases = gen["default_model"]["cases"]
    assert {(c["resolution"], c["batch"]) for c in cases} == {(32, 1), (32, 4), (64, 1), (64, 4)}
    for c in cases:
        where = f"generation {c['resolution']}px b{c['batch']}"
        assert c["process"] == "subprocess"  # each configuration's peak RSS is its own
        for key in ("latency_s", "throughput_img_s", "peak_rss_mb", "rss_after_load_mb"):
            _positive(c[key], f"{where} {key}")
        for stage in ("text", "ar", "diffusion", "decode", "total"):
            _positive(c["stages_s"][stage], f"{where} {stage} s")
            _positive(c["macs"][stage], f"{where} {stage} MACs")
        assert c["macs"]["total"] == sum(c["macs"][s] for s in ("text", "ar", "diffusion", "decode"))
        _positive(c["ar_fraction_of_fp32_peak_side_by_side"], f"{where} AR/peak side by side")

    vs = data["vs_diffusion"]["default_model"]
    assert "skipped" in data["vs_diffusion"]["full_size"]
    assert abs(vs["param_ratio_dit_over_hart"] - 1) < 0.02
    assert {c["resolution"] for c in vs["cases"]} == {32, 64}
    for c in vs["cases"]:
        assert c["denoiser_rows_per_step"] == 2  # batch 1, cond + uncond
        assert set(c["steps"]) == {"20", "50"}
        for n, d in c["steps"].items():
            where = f"vs_diffusion {c['resolution']}px {n} steps"
            assert d["extrapolated"] is True  # quick mode times a few steps and scales
            for key in ("latency_ratio_dit_over_hart", "macs_ratio_dit_over_hart", "dit_latency_s", "dit_macs"):
                _positive(d[key], f"{where} {key}")
        assert c["steps"]["50"]["dit_macs"] > c["steps"]["20"]["dit_macs"]
        assert c["hart_macs"]["decode_calls"] == 1  # like for like: one decode each

    limit = data["vs_limit"]
    assert len(limit["cases"]) == len(cases)
    for r in limit["cases"]:
        for key in ("achieved_gflops", "fraction_of_fp32_peak", "fraction_of_fp32_peak_side_by_side",
                    "fraction_of_bf16_peak"):
            _positive(r[key], f"vs_limit {r['resolution']}px b{r['batch']} {key}")

    head = data["residual_head"]
    for c in head["cases"]:
        assert set(c["steps"]) == {"1", "4", "8", "16"}
        for n, d in c["steps"].items():
            for key in ("head_s", "total_s", "time_share", "head_macs", "macs_share"):
                _positive(d[key], f"residual head {c['resolution']}px {n} steps {key}")
        # a fixed part once per call (condition projection, time embeddings), then the same cost per step
        m = {k: c["steps"][k]["head_macs"] for k in ("1", "4", "8", "16")}
        assert m["16"] - m["8"] == 2 * (m["8"] - m["4"]) and 3 * (m["8"] - m["4"]) == 4 * (m["4"] - m["1"])
        assert m["16"] < 16 * m["1"]  # the fixed part is not repeated per step

    layout = data["decode_layout"]
    assert "skipped" in layout["full_size"]
    assert {(c["resolution"], c["precision"]) for c in layout["default_model"]["cases"]} == {
        (r, p) for r in (32, 64) for p in settings["precisions"]}
    for c in layout["default_model"]["cases"]:
        for key in ("contiguous_s", "channels_last_s", "speedup"):
            _positive(c[key], f"decode layout {c['resolution']}px {c['precision']} {key}")

    train = data["training"]
    assert train["preset"] == "tiny" and train["resolution"] == 64
    for key in ("steps_per_s_full", "steps_per_s_drop", "speedup_drop_over_full"):
        _positive(train[key], f"training {key}")
    assert train["kept_last_scale_tokens_mean"] < train["last_scale_tokens"]


def test_markdown_tables_render(tiny_run, tmp_path):
    data, stdout = tiny_run
    from bench.report import markdown
    text = markdown(data)
    for title in ("### Machine", "### Peak matmul", "### Generation", "### HART vs an equal-size DiT",
                  "### AR pass vs measured peak", "### Residual diffusion head", "### Decoder memory layout",
                  "### AR training"):
        assert title in text
    assert text == stdout  # the run prints the same tables it would render from its JSON
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    for cli in (["bench/run.py"], ["-m", "bench"]):  # the script and the package entry point alike
        proc = subprocess.run([sys.executable, *cli, "--markdown", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout == text, (cli, proc.stderr[-2000:])


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("bench-*.json")), ids=lambda p: p.name)
def test_stored_results_still_render(path):
    """Every recorded run renders with today's renderer: its settings (e.g. options since
    removed) are kept as data, and every section it holds becomes a table."""
    from bench.report import markdown
    data = json.loads(path.read_text())
    text = markdown(data)
    assert text.startswith(f"Run: `{data['command']}`")
    titles = {"machine": "### Machine", "peak_matmul": "### Peak matmul", "generation": "### Generation",
              "vs_diffusion": "### HART vs an equal-size DiT", "vs_limit": "### AR pass vs measured peak",
              "residual_head": "### Residual diffusion head", "decode_layout": "### Decoder memory layout",
              "training": "### AR training"}
    for section, title in titles.items():
        assert (title in text) == bool(data.get(section)), (section, path.name)


def test_forced_bf16_generation_runs_under_autocast(tmp_path):
    out = tmp_path / "bf16.json"
    cmd = [sys.executable, "bench/run.py", "--tiny", "--only", "vs_diffusion", "--precisions", "fp32,bf16",
           "--force-bf16", "--resolutions", "32", "--repeats", "1", "--threads", "1", "--dit-steps", "2",
           "--cfg", "0", "--in-process", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["sections"] == ["machine", "vs_diffusion"] and data["command"].startswith("python bench/run.py ")
    block = data["vs_diffusion"]["default_model"]
    cases = block["cases"]
    assert [c["precision"] for c in cases] == ["fp32", "bf16"]
    # --cfg 0 applies to both sides: no unconditional rows in the DiT, none in HART's AR pass
    assert block["cfg"] == 0 and all(c["denoiser_rows_per_step"] == 1 for c in cases)
    for c in cases:
        _positive(c["steps"]["2"]["latency_ratio_dit_over_hart"], f"{c['precision']} ratio")
    assert "| bf16 |" in proc.stdout  # the markdown table has a precision column


def test_counted_macs_leave_out_the_one_time_unconditional_prefix():
    from bench.flops import pipeline_macs
    from hart.pipeline import HARTPipeline
    pipe = HARTPipeline.from_preset("tiny")
    first = pipeline_macs(pipe, resolution=32, num_images=1, seed=0, cfg=3.0)  # builds the kept prefix
    again = pipeline_macs(pipe, resolution=32, num_images=1, seed=0, cfg=3.0)  # reuses it, like a timed call
    assert first["uncond_prefix_once"] > 0 and again["uncond_prefix_once"] == 0
    assert first["ar"] == again["ar"] and first["total"] == again["total"]


def test_attention_benchmark_reports_rates(tmp_path):
    out = tmp_path / "attention.json"
    cmd = [sys.executable, "bench/attention.py", "--queries", "32", "--keys", "96", "--repeats", "2",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["shape"]["queries"] == 32 and data["shape"]["keys"] == 96
    for precision in ("bf16", "fp32"):
        entry = data["precisions"][precision]
        for variant in ("sdpa", "math", "chunked", "gemm"):
            _positive(entry["gflops"][variant]["median"], f"{precision} {variant}")
        for variant in ("math", "chunked"):
            assert entry["max_abs_error_vs_fp32_sdpa"][variant] < (0.05 if precision == "bf16" else 1e-4)
        _positive(entry["sdpa_rate_over_gemm_rate"], f"{precision} ratio")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_attention_probe_chunked_kernel_matches_sdpa(dtype, tolerance):
    """The probe's own chunked attention: blocks of queries (a last, shorter block included) per
    row and head give SDPA's result."""
    from bench.attention import chunked_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (37, 50, 50))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = chunked_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=16 ** -0.5, chunk=8)
    assert out.dtype == dtype and out.shape == reference.shape
    assert (out.float() - reference).abs().max() < tolerance


def test_removed_attention_option_is_refused():
    """The benchmark has no chunked-attention setting: the model always runs SDPA."""
    proc = subprocess.run([sys.executable, "bench/run.py", "--attention-query-chunk", "256", "--markdown", "x.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
