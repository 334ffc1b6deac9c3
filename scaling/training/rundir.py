"""Run directories and ids: a deterministic function of the config and of the data's content, so
re-running resumes, and re-running on changed data trains a new run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from scaling.config import RunConfig, to_dict
from scaling.shapes import without_later_defaults
from scaling.training.source_files import fingerprint


def config_hash(cfg: RunConfig, length: int = 8) -> str:
    """Hash of everything that changes what is trained (not where or how it is logged): the
    config, and the content of the files it reads (source_files.fingerprint)."""
    values = to_dict(cfg)
    values.pop("logging")
    values.pop("sweep")  # a grid member trains exactly what a separate run at its LR trains
    values.pop("mesh")  # the same run on another mesh (or host count) resumes the same directory
    values["train"].pop("out_dir")
    values["train"].pop("grad_accum")  # the batch's gradient in parts: the same run resumes
    values["data"].pop("cache_dir")  # where tokens are cached, not what they are
    content = fingerprint(cfg.data)
    if content is not None:  # the standard library has none: its runs keep their names
        values["data"]["content_sha256"] = content
    values = without_later_defaults(values)
    if not values["init"]:
        values.pop("init")
    else:  # the source's name hashes what it trained; its folder may be given any way
        values["init"]["from_run"] = Path(values["init"]["from_run"]).name
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def run_name(cfg: RunConfig) -> str:
    m, o = cfg.model, cfg.optim
    return (f"{m.label}-w{m.width}-d{m.depth}-{cfg.param.name}-{o.name}-lr{o.lr:g}"
            f"-s{cfg.train.seed}-{config_hash(cfg)}")
