"""Replays a finished MeZO run from its log: the parameters without a single forward pass."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from scaling.config import from_dict
from scaling.files import read_jsonl
from scaling.parametrization import build_model
from scaling.steps.zeroth_order import ZerothOrderStep, replay, zo_setup
from scaling.training.loop import pretrained_params


def replay_run(run_dir: str | Path, through_step: int | None = None):
    """The parameters of the `optim=mezo` run in `run_dir` after `through_step` steps (default:
    every logged step), rebuilt from its config's initial weights (a fine-tune's: its source's
    last ones) and zo_steps.jsonl alone."""
    run_dir = Path(run_dir)
    result = run_dir / "result.json"
    if not result.exists():
        raise ValueError(f"run_dir={str(run_dir)!r}: expected a run directory with result.json")
    cfg = from_dict(json.loads(result.read_text())["config"])
    if cfg.optim.needs_gradient:
        raise ValueError(f"optim.name={cfg.optim.name!r} in {run_dir}: expected a zeroth-order "
                         "run (only MeZO logs what a replay needs)")
    vocab_size = cfg.data.source_vocab_size
    model, parametrization = build_model(cfg.model, cfg.param, vocab_size, cfg.train.seed)
    records = [r for r in read_jsonl(run_dir / ZerothOrderStep.log_name)
               if through_step is None or r["step"] <= through_step]
    setup = zo_setup(cfg.optim, parametrization, total_steps=cfg.train.steps,
                     seed=cfg.train.seed)
    params = nnx.state(model).to_pure_dict()
    if cfg.init.from_run is not None:
        params = pretrained_params(cfg, vocab_size, params)
    return replay(params, setup, records)
