"""Numerical parity with the official implementation on a fixture folder.

    python -m hart.check_parity FIXTURE_DIR [--tolerance 1e-4]

A fixture folder holds a checkpoint in the official layout (`llm/`, `tokenizer/`) and
`cases.safetensors` with inputs and outputs the official code computed. Every stored case is
recomputed with our code; each line reports the max abs error and pass/fail (indices must
match exactly, floats within tol * max(1, max|expected|)). Exit code 0 only if all pass.
Later stages are fed the stored upstream values, so one mismatch does not hide the rest.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
import sys

import torch
from safetensors.torch import load_file

from .official import load_official
from .sampler import SamplingOptions, sample


@dataclass
class CaseResult:
    name: str
    error: float
    passed: bool
    exact: bool


def compare(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> CaseResult:
    if tuple(got.shape) != tuple(expected.shape):
        return CaseResult(f"{name} (shape {tuple(got.shape)} vs {tuple(expected.shape)})", float("inf"), False, False)
    if not expected.is_floating_point():
        mismatches = (got != expected).sum().item()
        return CaseResult(name, float(mismatches), mismatches == 0, True)
    err = (got.float() - expected.float()).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    return CaseResult(name, err, err <= bound, False)


@torch.no_grad()
def run_cases(folder: str | Path, tol: float = 1e-4) -> list[CaseResult]:
    folder = Path(folder)
    cases = load_file(str(folder / "cases.safetensors"))
    tokenizer, transformer = load_official(folder, use_ema=True)
    num_scales = len([k for k in cases if k.startswith("tok.idx.")])
    sizes = list(transformer.config.patch_nums)
    if len(sizes) != num_scales:
        raise ValueError(f"llm/config.json has {len(sizes)} scales but the cases have {num_scales}")
    results: list[CaseResult] = []

    def check(name, got):
        results.append(compare(name, got, cases[name], tol))

    # tokenizer
    images = cases["tok.images"]
    check("tok.f", tokenizer.encode_latent(images))
    indices, residual = tokenizer.encode(images, sizes)
    for k in range(num_scales):
        check(f"tok.idx.{k}", indices[k])
    stored_idx = [cases[f"tok.idx.{k}"] for k in range(num_scales)]
    fhat = tokenizer.indices_to_fhat(stored_idx, sizes)
    check("tok.fhat", fhat)
    _, rest_before_last = tokenizer.quantize.encode(cases["tok.f"], sizes)
    check("tok.frest_before_last", rest_before_last)
    check("tok.residual", residual)
    check("tok.img_discrete", tokenizer.decode(cases["tok.fhat"]))
    check("tok.img_hybrid", tokenizer.decode(cases["tok.fhat"], cases["tok.residual"]))

    # teacher-forced transformer (EMA and raw weights)
    tf_idx = [cases[f"tf.idx.{k}"] for k in range(num_scales)]
    check("tf.x_BLCv_wo_first_l", tokenizer.quantize.teacher_forcing_inputs(tf_idx, sizes))
    args = (cases["tf.context"], cases["tf.context_position_ids"], cases["tf.x_BLCv_wo_first_l"], sizes)
    logits, hidden_last, _ = transformer(*args)
    check("tf.logits", logits)
    z = transformer.diffusion_condition(hidden_last, tokenizer.codebook[cases["tf.last_layer_gt_discrete"]])
    check("tf.diff_cond", z)
    check("tf.diff_target", cases["tf.last_layer_gt"] - tokenizer.codebook[cases["tf.last_layer_gt_discrete"]])
    if "tf.logits_nonema" in cases:
        _, raw = load_official(folder, use_ema=False)
        check("tf.logits_nonema", raw(*args)[0])

    # diffusion head: network, then the sampling loop with the stored noise
    head = transformer.diffloss
    check("diff.out", head.net(cases["diff.x"], cases["diff.t"], cases["diff.z"]))
    zs = cases["dsample.z"]
    half = zs.shape[0] // 2
    steps = cases["dsample.noise_steps"].shape[0]
    sched = head.schedule(steps)
    check("dsample.timesteps", torch.tensor(sched.timesteps[::-1].copy(), dtype=torch.long))
    out = head.sample(zs[:half], zs[half:], cfg=cases["dsample.cfg"].item(), steps=steps,
                      noise=(cases["dsample.noise_init"], list(cases["dsample.noise_steps"])))
    check("dsample.out", out)

    # full greedy sampler with the stored diffusion noise
    opts = SamplingOptions(cfg=cases["sample.cfg"].item(), top_k=1,
                           diffusion_steps=cases["sample.noise_steps"].shape[0])
    result = sample(transformer, tokenizer, cases["sample.context"], cases["sample.context_position_ids"], sizes,
                    opts, diffusion_noise=(cases["sample.noise_init"], list(cases["sample.noise_steps"])),
                    keep_logits=True)
    for k in range(num_scales):
        check(f"sample.logits.{k}", result.logits[k])
        check(f"sample.idx.{k}", result.indices[k])
    check("sample.residual", result.residual)
    check("sample.img_discrete", (tokenizer.decode(result.fhat_discrete) + 1) / 2)
    check("sample.img_hybrid", (tokenizer.decode(result.fhat_discrete, result.residual) + 1) / 2)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", help="folder with llm/, tokenizer/ and cases.safetensors")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative tolerance for floats")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = run_cases(args.fixture, args.tolerance)
    width = max(len(r.name) for r in results)
    for r in results:
        kind = "mismatches" if r.exact else "max abs err"
        value = f"{int(r.error)}" if r.exact and r.error != float("inf") else f"{r.error:.3e}"
        print(f"{r.name:<{width}}  {kind:>11} {value:>10}  {'PASS' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
