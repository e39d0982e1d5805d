"""Run a training recipe: every stage of train/configs/<recipe>/ in order, into one folder.

    python -m train.recipe hart-emoji --out DIR            # the shipped model: DIR/model + its eval.json
    python -m train.recipe hart-emoji --out DIR --smoke    # the same stages and architecture, tiny steps and data

Each stage file `NN-<name>.yaml` holds `stage` (its kind: dataset, tokenizer, ar, head, package or
evaluate), `config` (the fields of that kind's config; "{out}" stands for DIR) and `smoke` (the
fields --smoke replaces). A trainer stage writes to DIR/<name> unless its config names `out`.
Rerunning the same command continues where it stopped: a stage is finished once its marker
DIR/done/<name>.json is written (atomically, after its output), and finished stages are skipped;
an interrupted trainer resumes from its newest checkpoint.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
import json
from pathlib import Path
import sys
import time

from hart.checkpoint import write_json

from .engine import logged_seconds, make_config, read_config_file
from .train_ar import ARTrainConfig, trained_resolutions, transformer_config
from .train_head import head_config, HeadTrainConfig
from .train_tokenizer import tokenizer_config, TokenizerTrainConfig

CONFIGS = Path(__file__).resolve().parent / "configs"
OUT = "{out}"


@dataclass
class DatasetConfig:
    out: str = "data/emoji"
    resolutions: tuple = (64, 128)
    limit: int = 0                     # 0: every emoji the font draws; else the first N (by caption)


@dataclass
class PackageConfig:
    model: str = ""
    out: str = ""
    name: str = ""
    tokenizer: str = ""                # a decoder-finetuned tokenizer folder, if any
    dtype: str = "fp16"


@dataclass
class EvaluateConfig:
    model: str = ""                    # the report goes to model/eval.json
    data: str = "data/emoji"
    count: int = 300                   # prompts per set (exact, paraphrase)
    sweep_count: int = 100
    cfgs: tuple = (0.0, 1.0, 2.0, 3.0, 4.5)
    top_ks: tuple = (0, 50, 10)
    temperatures: tuple = (1.0, 0.5)
    residual_temperatures: tuple = (1.0, 0.5, 0.0)
    residual_cfgs: tuple = (None, 0.0)
    choose_defaults: bool = True       # write the sweep's best sampling settings into the model
    latency_repeats: int = 5


KINDS = {"dataset": DatasetConfig, "tokenizer": TokenizerTrainConfig, "ar": ARTrainConfig,
         "head": HeadTrainConfig, "package": PackageConfig, "evaluate": EvaluateConfig}
TRAINERS = ("tokenizer", "ar", "head")  # the kinds that run train.engine and keep a log.jsonl


@dataclass
class Stage:
    name: str
    kind: str
    config: object                     # the kind's config dataclass, paths under "{out}"


def load_recipe(recipe: str, smoke: bool = False) -> list[Stage]:
    """The stages of train/configs/<recipe>/, in file-name order, with the smoke overrides if asked."""
    folder = CONFIGS / recipe
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ValueError(f"no recipe {recipe!r}: {folder} has no stage files "
                         f"(recipes: {', '.join(p.name for p in CONFIGS.iterdir() if p.is_dir())})")
    stages = []
    for path in files:
        spec = read_config_file(path)
        unknown = set(spec) - {"stage", "config", "smoke"}
        if unknown or spec.get("stage") not in KINDS:
            raise ValueError(f"{path}: needs `stage` (one of {', '.join(KINDS)}), `config` and `smoke`; "
                             f"got {sorted(spec)}")
        name = path.stem.split("-", 1)[1]
        cls = KINDS[spec["stage"]]
        values = {**(spec.get("config") or {}), **((spec.get("smoke") or {}) if smoke else {})}
        if "out" in {f.name for f in fields(cls)}:
            values.setdefault("out", f"{OUT}/{name}")
        stages.append(Stage(name, spec["stage"], make_config(cls, values, str(path))))
    return stages


def recipe_record(recipe: str, smoke: bool = False) -> dict:
    """What recipe.json holds: the recipe's name and every stage's full config."""
    return {"recipe": recipe, "smoke": smoke,
            "stages": [{"name": s.name, "stage": s.kind, "config": json.loads(json.dumps(asdict(s.config)))}
                       for s in load_recipe(recipe, smoke)]}


def resolve_architecture(stages: list[Stage]) -> dict:
    """The packaged model's tokenizer and transformer configs and resolutions, as the stages build
    them: each trainer's own config rules, applied in order (a warm start keeps what it loads)."""
    tokenizer = transformer = None
    resolutions = {}
    for stage in stages:
        cfg = stage.config
        if stage.kind == "tokenizer":
            tokenizer = tokenizer_config(cfg, tokenizer if cfg.init_from and not cfg.init_partial else None)
        elif stage.kind == "ar":
            transformer = transformer_config(cfg, tokenizer, transformer if cfg.init_from else None)
            resolutions = trained_resolutions(cfg)
        elif stage.kind == "head":
            transformer = head_config(cfg, transformer)
    return {"tokenizer": asdict(tokenizer), "transformer": asdict(transformer),
            "resolutions": {str(r): list(s) for r, s in sorted(resolutions.items())}}


def _in_folder(config, out: Path):
    """`config` with "{out}" replaced by the output folder in every string field."""
    return replace(config, **{f.name: getattr(config, f.name).replace(OUT, str(out)) for f in fields(config)
                              if isinstance(getattr(config, f.name), str)})


def run_stage(stage: Stage, cfg, record: dict) -> dict:
    """Run one stage with `cfg` (paths resolved); returns what it reports."""
    if stage.kind == "dataset":
        from .build_emoji_dataset import build
        return build(Path(cfg.out), list(cfg.resolutions), cfg.limit or None)
    if stage.kind == "tokenizer":
        from .train_tokenizer import train
        return train(cfg)
    if stage.kind == "ar":
        from .train_ar import train
        return train(cfg)
    if stage.kind == "head":
        from .train_head import train
        return train(cfg)
    if stage.kind == "package":
        from .package import package
        package(cfg.model, cfg.out, cfg.name, cfg.tokenizer, cfg.dtype, recipe=record)
        return {"out": cfg.out}
    from .evaluate import evaluate
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    report = evaluate(**values)
    write_json(report, Path(cfg.model) / "eval.json")
    return {"sampling_defaults": report["sampling_defaults"]}


def run(recipe: str, out: str | Path, smoke: bool = False) -> dict[str, float]:
    """Every unfinished stage in order; returns each stage's seconds (0 for one finished before), which
    for a resumed trainer include the logged time of the processes that ran it before."""
    out = Path(out)
    record = recipe_record(recipe, smoke)
    seconds = {}
    for stage in load_recipe(recipe, smoke):
        marker = out / "done" / f"{stage.name}.json"
        if marker.is_file():
            print(f"[{stage.name}] finished before: skipped", flush=True)
            seconds[stage.name] = 0.0
            continue
        print(f"[{stage.name}] {stage.kind} stage", flush=True)
        cfg = _in_folder(stage.config, out)
        # a trainer stopped and resumed across several commands: count the earlier processes' logged time too
        earlier = logged_seconds(Path(cfg.out) / "log.jsonl") if stage.kind in TRAINERS else 0.0
        started = time.time()
        result = run_stage(stage, cfg, record)
        if isinstance(result, dict) and "stopped_by_signal" in result:
            raise SystemExit(f"[{stage.name}] stopped by a signal at step {result['step']}; "
                             "run the same command again to continue")
        seconds[stage.name] = round(earlier + time.time() - started, 1)
        write_json({"stage": stage.kind, "seconds": seconds[stage.name],
                    "config": json.loads(json.dumps(asdict(stage.config)))}, marker)
        print(f"[{stage.name}] done in {seconds[stage.name]} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe: the name of a folder under train/configs/ (e.g. hart-emoji)")
    parser.add_argument("--out", required=True, help="where every stage writes; the model ends in OUT/model")
    parser.add_argument("--smoke", action="store_true", help="the same stages with tiny step counts and data")
    args = parser.parse_args(argv)
    started = time.time()
    seconds = run(args.recipe, args.out, args.smoke)
    print(json.dumps({"seconds": seconds, "total": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
