"""Evaluate a trained pipeline on its dataset: tokenizer reconstruction, retrieval of generated
images for exact captions and for paraphrases in wording never used in training, what the
residual head adds, latency, and a cfg / top-k sweep that can choose the model's defaults.

    python -m train.evaluate --model assets/hart-emoji --data data/emoji --out eval.json [--choose-defaults]
    python -m train.evaluate --tokenizer work/tok64/tokenizer --out tok-eval.json   # tokenizer only, 64 + 128 px
    python -m train.evaluate --compare new/eval.json assets/hart-emoji/eval.json    # exits 1 if a row is worse

Retrieval: every generated image is compared (pixel L2 at 32x32) with every dataset image; top-1
is a hit when the nearest one is the prompt's own emoji.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hart.pipeline import HARTPipeline
from hart.presets import get_preset
from .common import head_tokens, images_to_tensor, load_tokenizer, teacher_forced_condition
from .data import HELD_OUT_TEMPLATES, load_dataset
from .metrics import psnr
from .train_tokenizer import evaluate as evaluate_tokenizer


def retrieval_features(images: torch.Tensor, side: int = 32) -> torch.Tensor:
    return F.interpolate(images, size=(side, side), mode="area").flatten(1)


def retrieve(images: torch.Tensor, database: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each image's target among the database (0 = nearest) and its nearest distance."""
    dist = torch.cdist(retrieval_features(images), database)
    return (dist < dist.gather(1, targets[:, None])).sum(1), dist.min(1).values


def prompt_sets(captions: list[dict], count: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """(prompt, target index) pairs: exact captions, and paraphrases with held-out templates."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(captions)), min(count, len(captions)))
    exact = [(captions[i]["text"], i) for i in picked]
    paraphrase = []
    for i in picked:
        name = captions[i]["text"]
        aliases = [a for a in captions[i].get("aliases") or [] if a != name]
        if aliases and rng.random() < 0.3:
            name = rng.choice(aliases)
        paraphrase.append((rng.choice(HELD_OUT_TEMPLATES).format(name), i))
    return {"exact": exact, "paraphrase": paraphrase}


@torch.no_grad()
def generate_and_retrieve(pipe, prompts, resolution, database, references, batch: int = 50, **kwargs) -> dict:
    """Generate one image per prompt; report retrieval and PSNR to the reference for hybrid and
    discrete-only outputs, and the residual's gain over the prompts whose hybrid image retrieves."""
    stats = {"hybrid": {"rank": [], "dist": [], "psnr": []}, "discrete": {"rank": [], "dist": [], "psnr": []}}
    gains = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        result = pipe([p for p, _ in chunk], resolution=resolution, seed=start, **kwargs)
        targets = torch.tensor([t for _, t in chunk])
        outputs = {"hybrid": images_to_tensor(result.images), "discrete": images_to_tensor(result.discrete_images)}
        ref = references[targets]
        for name, images in outputs.items():
            rank, nearest = retrieve(images, database, targets)
            stats[name]["rank"] += rank.tolist()
            stats[name]["dist"] += nearest.tolist()
            stats[name]["psnr"] += psnr(images, ref).tolist()
        hits = torch.tensor(stats["hybrid"]["rank"][-len(chunk):]) == 0
        last = {name: torch.tensor(s["psnr"][-len(chunk):]) for name, s in stats.items()}
        gains += (last["hybrid"] - last["discrete"])[hits].tolist()
    report = {}
    for name, s in stats.items():
        ranks = torch.tensor(s["rank"])
        report[name] = {"top1": round((ranks == 0).float().mean().item(), 4),
                        "top5": round((ranks < 5).float().mean().item(), 4),
                        "mean_nn_distance": round(statistics.fmean(s["dist"]), 4),
                        "psnr_to_reference_db": round(statistics.fmean(s["psnr"]), 3)}
    report["residual_gain_db"] = round(statistics.fmean(gains), 3) if gains else None
    report["correct_for_gain"] = len(gains)
    return report


@torch.no_grad()
def reconstruction_retrieval(tokenizer, references: torch.Tensor, database: torch.Tensor, scales,
                             batch: int = 256) -> dict:
    """Top-1 retrieval of every dataset image's own tokenizer reconstruction: the ceiling on
    generation top-1 (an AR model that reproduced the tokens exactly would reach it)."""
    tokenizer.eval()
    hits = {"discrete": 0, "hybrid": 0}
    for start in range(0, len(references), batch):
        images = references[start:start + batch]
        indices, residual = tokenizer.encode(images.to(tokenizer.codebook.dtype), scales)
        fhat = tokenizer.indices_to_fhat(indices, scales)
        targets = torch.arange(start, start + len(images))
        for name, recon in (("discrete", tokenizer.decode(fhat)), ("hybrid", tokenizer.decode(fhat, residual))):
            rank, _ = retrieve(recon.float().clamp(-1, 1), database, targets)
            hits[name] += int((rank == 0).sum())
    return {f"recon_top1_{name}": round(count / len(references), 4) for name, count in hits.items()}


@torch.no_grad()
def residual_head_check(pipe, references: torch.Tensor, captions: list[str], scales, count: int = 128,
                        seed: int = 0, low_references: torch.Tensor | None = None, coarse_scales: int = 0,
                        coarse_remainder: bool = False) -> dict:
    """What the residual head adds when the discrete tokens are exactly right: teacher-forced
    transformer on dataset images and their own captions, then decoded with no residual, with the
    true residual (the head's ceiling) and with the head's sample at the default temperature. With
    `coarse_scales` (and `coarse_remainder`), the true tokens and the residual are built as the
    sampler meets them (`common.head_tokens`); the decodes then add the low image's remainder."""
    tf, tok = pipe.transformer, pipe.tokenizer
    picked = torch.randperm(len(references), generator=torch.Generator().manual_seed(seed))[:count]
    images = references[picked].to(tok.codebook.dtype)
    continuous_last = tf.continuous_last(scales)
    low = low_references[picked] if coarse_scales else None
    indices, residual = head_tokens(tok, tf, images, scales, low, coarse_scales, coarse_remainder)
    fhat = tok.indices_to_fhat(indices, scales, continuous_last)
    if coarse_remainder:  # the base every decode starts from: the low image's whole latent
        fhat = fhat + tok.encode_upsampled(low, scales, continuous_last)[1].transpose(1, 2).reshape(fhat.shape)
    states, _, positions = pipe.text_encoder([captions[int(i)] for i in picked])
    z = teacher_forced_condition(tf, tok, states, positions, indices, scales, coarse_scales)
    predicted = tf.diffloss.sample(z.flatten(0, 1), steps=pipe.sampling_defaults.diffusion_steps,
                                   temperature=pipe.sampling_defaults.residual_temperature,
                                   generator=torch.Generator().manual_seed(seed)).view_as(residual)
    base = psnr(tok.decode(fhat), images)
    error = (predicted.float() - residual.float()).square().mean() / residual.float().square().mean()
    return {"images": len(picked),
            "true_residual_gain_db": round((psnr(tok.decode(fhat, residual), images) - base).mean().item(), 3),
            "predicted_residual_gain_db": round((psnr(tok.decode(fhat, predicted.to(fhat.dtype)), images)
                                                 - base).mean().item(), 3),
            "residual_variance_explained": round(1 - error.item(), 4)}


def latency(pipe, resolution: int, repeats: int = 5) -> float:
    pipe("red apple", resolution=resolution, seed=0)  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        pipe("red apple", resolution=resolution, seed=i)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def sweep(pipe, prompt_sets_by_res: dict, databases: dict, references: dict, settings: list[dict]) -> list[dict]:
    """Hybrid top-1 for each sampling setting, per resolution and prompt set; `score` is the
    mean over all of them, `residual_gain_db` the mean residual gain (what the choice maximises)."""
    rows = []
    stored_residual_cfg = pipe.sampling_defaults.residual_cfg
    try:
        for setting in settings:
            row = dict(setting)
            # residual_cfg None (the last scale's cfg) is no call override, so it goes through the defaults
            kwargs = dict(setting)
            pipe.sampling_defaults.residual_cfg = kwargs.pop("residual_cfg", stored_residual_cfg)
            scores, gains = [], []
            for res, sets in prompt_sets_by_res.items():
                for name, prompts in sets.items():
                    r = generate_and_retrieve(pipe, prompts, res, databases[res], references[res], **kwargs)
                    key = f"{name}_top1" if len(prompt_sets_by_res) == 1 else f"{res}_{name}_top1"
                    row[key] = r["hybrid"]["top1"]
                    scores.append(r["hybrid"]["top1"])
                    if r["residual_gain_db"] is not None:
                        gains.append(r["residual_gain_db"])
            row["score"] = round(statistics.fmean(scores), 4)
            row["residual_gain_db"] = round(statistics.fmean(gains), 3) if gains else None
            rows.append(row)
    finally:
        pipe.sampling_defaults.residual_cfg = stored_residual_cfg
    return rows


def evaluate(model: str, data: str, count: int = 300, cfgs: tuple = (0.0, 1.0, 2.0, 3.0, 4.5),
             top_ks: tuple = (0, 50, 10), residual_temperatures: tuple = (1.0, 0.5, 0.0), sweep_count: int = 100,
             seed: int = 0, val_fraction: float = 0.05, choose_defaults: bool = False,
             residual_cfgs: tuple = (None, 0.0), temperatures: tuple = (1.0, 0.5),
             latency_repeats: int = 5) -> dict:
    """The report. With choose_defaults the sweep runs first on prompts disjoint from the
    reported ones: cfg, top-k and the token sampling temperature (by retrieval top-1), then the
    residual head's noise temperature and then its guidance (None: the last scale's cfg), both by
    residual gain. The best setting is written into the model's model_index.json, and every
    reported number uses it."""
    pipe = HARTPipeline.from_pretrained(model)
    full, references, databases, sets, sweep_sets = {}, {}, {}, {}, {}
    for res in pipe.resolutions:
        full[res] = load_dataset(data, res, "all", caption_variation=False)
        references[res] = torch.stack([full[res].image(i) for i in range(len(full[res].captions))])
        databases[res] = retrieval_features(references[res])
        both = prompt_sets(full[res].captions, count + sweep_count, seed)
        sets[res] = {k: v[:count] for k, v in both.items()}
        # a dataset too small for two disjoint sets sweeps on the reported prompts (and says so)
        disjoint = all(len(v) > count for v in both.values())
        sweep_sets[res] = {k: v[count:] if disjoint else v[:sweep_count] for k, v in both.items()}
    # one key at a time on top of the best setting so far: cfg, top-k and temperature by retrieval top-1,
    # then the residual temperature and its guidance by residual gain (a value already measured is not rerun)
    defaults = pipe.sampling_defaults
    best = {"cfg": defaults.cfg, "top_k": defaults.top_k, "temperature": defaults.temperature,
            "residual_temperature": defaults.residual_temperature, "residual_cfg": defaults.residual_cfg}
    rows = []
    for key, values, measure in (("cfg", cfgs, "score"), ("top_k", top_ks, "score"),
                                 ("temperature", temperatures, "score"),
                                 ("residual_temperature", residual_temperatures, "residual_gain_db"),
                                 ("residual_cfg", residual_cfgs, "residual_gain_db")):
        rows += sweep(pipe, sweep_sets, databases, references,
                      [dict(best, **{key: v}) for v in values if not (rows and v == best[key])])
        candidates = [r for r in rows if all(r[k] == best[k] for k in best if k != key)]
        best = {k: v for k, v in max(candidates, key=lambda r: -1e9 if r[measure] is None else r[measure]).items()
                if k in best}
    chosen = best
    if choose_defaults:
        index_path = Path(model) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["sampling"].update(chosen)
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        for key, value in chosen.items():
            setattr(pipe.sampling_defaults, key, value)
    report = {"model": model, "sampling_defaults": vars(pipe.sampling_defaults).copy(),
              "sweep": {"prompts_per_set": sweep_count, "disjoint_from_reported_prompts": disjoint,
                        "rows": rows, "best": chosen, "written_to_model": choose_defaults},
              "resolutions": {}}
    for res in pipe.resolutions:
        scales = pipe.schedules[res]
        val = load_dataset(data, res, "val", val_fraction, seed)
        tok_metrics, _ = evaluate_tokenizer(pipe.tokenizer, val, scales)
        tok_metrics.update(reconstruction_retrieval(pipe.tokenizer, references[res], databases[res], scales))
        entry = {"tokenizer": tok_metrics, "generation": {}, "latency_s": latency(pipe, res, latency_repeats)}
        for name, prompts in sets[res].items():
            entry["generation"][name] = generate_and_retrieve(pipe, prompts, res, databases[res], references[res])
        entry["residual_gain_db"] = entry["generation"]["exact"]["residual_gain_db"]
        coarse = pipe.sampling_defaults.coarse_scales if res != pipe.default_resolution else 0
        entry["residual_head_teacher_forced"] = residual_head_check(
            pipe, references[res], [c["text"] for c in full[res].captions], scales,
            low_references=references[pipe.default_resolution], coarse_scales=coarse,
            coarse_remainder=bool(coarse) and pipe.sampling_defaults.coarse_remainder)
        report["resolutions"][str(res)] = entry
        print(json.dumps({res: entry}, indent=1), flush=True)
    return report


def evaluate_tokenizer_folder(folder: str, data: str, preset: str = "emoji", seed: int = 0,
                              val_fraction: float = 0.05) -> dict:
    """Held-out reconstruction of a bare tokenizer folder at every resolution of a preset's
    schedules (the numbers `evaluate` reports for a whole model, without generating)."""
    tokenizer = load_tokenizer(folder)
    report = {"tokenizer": folder, "resolutions": {}}
    for res, scales in sorted(get_preset(preset).resolutions.items()):
        val = load_dataset(data, res, "val", val_fraction, seed)
        report["resolutions"][str(res)], _ = evaluate_tokenizer(tokenizer, val, scales)
        print(res, report["resolutions"][str(res)], flush=True)
    return report


LOWER_IS_BETTER = ("latency", "distance")
NOT_QUALITY = ("model", "sweep", "sampling_defaults", "images", "correct_for_gain", "step")


def compare_reports(new: dict, old: dict, prefix: str = "") -> list[dict]:
    """Every quality number two `evaluate` reports share, as {row, new, old, at_least_as_good}: the
    check a retrained model passes before it replaces the shipped one. Latency and distances count as
    better when lower; sweep rows, settings and counts are not quality and are left out."""
    rows = []
    for key in old:
        if key in NOT_QUALITY or key not in new:
            continue
        row, a, b = f"{prefix}{key}", new[key], old[key]
        if isinstance(b, dict) and isinstance(a, dict):
            rows += compare_reports(a, b, row + ".")
        elif isinstance(b, (int, float)) and isinstance(a, (int, float)) and not isinstance(b, bool):
            lower = any(word in row for word in LOWER_IS_BETTER)
            rows.append({"row": row, "new": a, "old": b, "at_least_as_good": a <= b if lower else a >= b})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a pipeline folder: the full report")
    which.add_argument("--tokenizer", help="a tokenizer folder: held-out reconstruction only")
    which.add_argument("--compare", nargs=2, metavar=("NEW", "OLD"),
                       help="two eval.json reports: every shared quality row, and whether NEW is at least as good")
    parser.add_argument("--preset", default="emoji", help="with --tokenizer: whose scale schedules to use")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held-out split (as in training)")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--out", default="eval.json")
    parser.add_argument("--count", type=int, default=300, help="prompts per set (exact, paraphrase)")
    parser.add_argument("--sweep", default="0,1,2,3,4.5", help="cfg values to sweep")
    parser.add_argument("--sweep-top-k", default="0,50,10", help="top-k values to sweep at the best cfg")
    parser.add_argument("--sweep-temperature", default="1,0.5",
                        help="token sampling temperatures to sweep at the best cfg / top-k")
    parser.add_argument("--sweep-residual-temperature", default="1,0.5,0",
                        help="residual-head noise temperatures to sweep at the best cfg / top-k")
    parser.add_argument("--sweep-residual-cfg", default="last,0",
                        help="residual-head guidance values to sweep last ('last': the last scale's cfg)")
    parser.add_argument("--sweep-count", type=int, default=100, help="prompts per set in the sweep")
    parser.add_argument("--choose-defaults", action="store_true",
                        help="write the sweep's best cfg / top-k / temperature / residual temperature / residual cfg "
                             "into the model's model_index.json first")
    args = parser.parse_args(argv)
    if args.compare:
        new, old = (json.loads(Path(path).read_text()) for path in args.compare)
        rows = compare_reports(new, old)
        for r in rows:
            print(f"{'  ' if r['at_least_as_good'] else 'WORSE'} {r['row']}: {r['new']} (old {r['old']})")
        worse = sum(not r["at_least_as_good"] for r in rows)
        print(f"{len(rows)} rows, {worse} worse")
        return 1 if worse else 0
    if args.tokenizer:
        report = evaluate_tokenizer_folder(args.tokenizer, args.data, args.preset, val_fraction=args.val_fraction)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    report = evaluate(args.model, args.data, args.count, tuple(float(v) for v in args.sweep.split(",")),
                      tuple(int(v) for v in args.sweep_top_k.split(",")),
                      tuple(float(v) for v in args.sweep_residual_temperature.split(",")), args.sweep_count,
                      choose_defaults=args.choose_defaults,
                      residual_cfgs=tuple(None if v == "last" else float(v) for v in args.sweep_residual_cfg.split(",")),
                      temperatures=tuple(float(v) for v in args.sweep_temperature.split(",")))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
