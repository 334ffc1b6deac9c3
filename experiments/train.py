"""`scaling-train`: the Hydra app for one run (or a multirun sweep) of scaling/train.py.

Every command line is composed and validated before anything is compiled or written: each
point of a sweep, so that a typo ends the sweep before its first run. Errors are one line on
stderr (field, value, expectation) and exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.compose import ConfigError, precheck, to_run_config


def _fail(error: ConfigError) -> None:
    print(f"scaling-train: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    from scaling.training.loop import train_sweep  # after validation: importing jax is the slow part

    try:
        results = train_sweep(to_run_config(OmegaConf.to_container(cfg, resolve=True)))
    except ConfigError as error:
        _fail(error)
    for result in results:  # one per LR when sweep.log2_lr_min/max define a grid
        losses = f"train_loss={result['train_loss']} val_loss={result['val_loss']}"
        print(f"{result['run_dir']}: {losses} diverged={result['diverged']} "
              f"steps={result['steps']} wall={result['wall_seconds']:.1f}s")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = precheck(argv)
    except ConfigError as error:
        _fail(error)
    sys.argv = [sys.argv[0], *argv]
    _run()


if __name__ == "__main__":
    main()
