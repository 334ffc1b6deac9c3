"""Run directories and ids: a deterministic function of the config, so re-running resumes."""

from __future__ import annotations

import hashlib
import json

from scaling.config import RunConfig, to_dict


def config_hash(cfg: RunConfig, length: int = 8) -> str:
    """Hash of everything that changes what is trained (not where or how it is logged)."""
    values = to_dict(cfg)
    values.pop("logging")
    values.pop("sweep")  # a grid member trains exactly what a separate run at its LR trains
    values["train"].pop("out_dir")
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def run_name(cfg: RunConfig) -> str:
    m, o = cfg.model, cfg.optim
    return (f"{m.kind}-w{m.width}-d{m.depth}-{cfg.param.name}-{o.name}-lr{o.lr:g}"
            f"-s{cfg.train.seed}-{config_hash(cfg)}")
