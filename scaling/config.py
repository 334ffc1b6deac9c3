"""Typed run configuration: library code takes these dataclasses, never Hydra objects."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from models.config import BLOCK_OPTIONS, ModelConfig
from models.factory import load_factory
from optim.config import OPTIMIZERS, AdamWConfig, OptimizerConfig, Problem, expected_field
from scaling.rules import TUNABLE
from scaling.schemes import SCHEMES, Scheme


class ConfigError(ValueError):
    """A bad config value: names the field, the value and what was expected."""

    def __init__(self, field: str, value: Any, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"{field}={value!r}: expected {expected}")


BYTE_VOCAB = 256  # text sources are read as bytes
BPE_VOCAB_RANGE = (512, 65536)  # the 256 byte symbols and 256 merges at least; uint16 token ids


@dataclasses.dataclass(frozen=True)
class ParamConfig:
    name: str = "mup"  # a scheme of scaling/schemes.py SCHEMES
    base_width: int = 64
    base_depth: int = 4  # depth_mup and completep equal μP at this depth
    # Per-role multipliers tuned on the proxy and carried to any width (scaling/rules.py TUNABLE;
    # 1 leaves the table alone, and SP = μP at the base shape for every value)
    input_lr_mult: float = 1.0  # the embedding's LR, relative to the hidden LR (the base LR)
    output_lr_mult: float = 1.0  # the readout's LR
    vector_lr_mult: float = 1.0  # gains and biases
    output_mult: float = 1.0  # × the logits
    input_init_mult: float = 1.0  # × the embedding's init std (model.embed_std)
    attn_mult: float = 1.0  # × the attention logits' scale

    @property
    def scheme(self) -> Scheme:
        return SCHEMES[self.name]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # None: the interpreter's standard library
    # a .bin file's token ids; None: the dtype of its sidecar FILE.bin.json, else uint16
    dtype: Literal["uint16", "uint32"] | None = None
    vocab_size: int = 256  # bytes give 256; set it for .bin/.npy token files and tokenizer=bpe
    # the standard library's top-level packages and modules: all, or one of two halves (by the
    # CRC-32 of the name), e.g. pretrain on one and fine-tune on the other; data.path=null only
    packages: Literal["all", "half_a", "half_b"] = "all"
    # how text becomes tokens: bytes; bpe, a byte-level BPE of vocab_size trained on the
    # training split; or the path of a Hugging Face tokenizer.json (its vocabulary counts)
    tokenizer: str = "bytes"
    text_field: str = "text"  # the string field of each record of a .jsonl file
    cache_dir: str = "data_cache"  # tokenized text's token caches, relative to the working dir

    @property
    def holds_tokens(self) -> bool:
        """data.path is a file of token ids (.bin or .npy), read without a tokenizer."""
        return self.path is not None and Path(self.path).suffix in (".bin", ".npy")

    @property
    def source_vocab_size(self) -> int:
        """The vocabulary the source has, without reading it: bytes, data.vocab_size (a .bin or
        .npy file, or a BPE trained here), or the ids of a tokenizer.json."""
        if self.holds_tokens:
            return self.vocab_size
        if self.tokenizer == "bytes":
            return BYTE_VOCAB
        return self.vocab_size if self.tokenizer == "bpe" else tokenizer_file_vocab(self.tokenizer)


def tokenizer_file_vocab(path: str) -> int:
    """The ids a tokenizer.json can emit (its largest id + 1), read from the JSON itself: no
    tokenizer library needed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("data.tokenizer", path,
                          "bytes, bpe, or the path of an existing tokenizer.json")
    try:
        spec = json.loads(file.read_text())
        vocab = spec["model"]["vocab"]  # token -> id (BPE, WordPiece), or a list (Unigram)
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [token["id"] for token in spec.get("added_tokens") or []]
        return max(ids) + 1
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError("data.tokenizer", path,
                          "a Hugging Face tokenizer.json with a vocabulary (model.vocab; "
                          f"{type(error).__name__}: {error})") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # sequences per optimizer step (the global batch)
    seq_len: int = 128
    # micro-batches the batch is split into, their gradients accumulated inside the compiled
    # step: the same update as the whole batch, with 1/grad_accum of its activation memory
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    out_dir: str = "runs"


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the weights start: a fresh initialization, or a finished run's last checkpoint."""

    from_run: str | None = None  # a run directory (result.json, checkpoints/): fine-tuning


WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES = get_args(WandbMode)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    # None defers to the user's WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY, then to offline and
    # "scaling"; a value set here wins over the environment (scaling/training/tracking.py)
    wandb_mode: WandbMode | None = None
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    progress: bool = True
    # stability indicators in every logged step's metrics (docs/runs.md); the gradient norm and
    # clip factor are logged either way
    indicators: bool = True
    spectral_every: int = 50  # σ_max of every matrix every this many steps and at the end; 0: off


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """An LR grid trained by one job: 2**log2_lr_min, ... up to 2**log2_lr_max."""

    log2_lr_min: float | None = None  # None: no grid, one run at optim.lr
    log2_lr_max: float | None = None
    log2_lr_step: float = 0.5  # half-octave steps
    vectorize_lr: int = 1  # LRs of the grid trained together in one compiled program (vmap)
    # the value a `+tune=<field>` option (configs/tune/) gives its param field: a multirun over
    # tune options × multipliers tunes each transferable multiplier against the LR grid
    multiplier: float = 1.0


MeshAxis = Literal["data", "fsdp", "tensor"]
MESH_AXES = get_args(MeshAxis)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """The mesh axis each logical parameter axis (models/tagged.py) is split over; null keeps it
    whole. The batch is always split over data and fsdp (scaling/sharding.py)."""

    vocab: MeshAxis | None = "tensor"
    embed: MeshAxis | None = "fsdp"
    heads: MeshAxis | None = "tensor"
    mlp: MeshAxis | None = "tensor"
    head_dim: MeshAxis | None = None  # QK-norm's per-head gains: small, kept whole
    layers: MeshAxis | None = None
    context: MeshAxis | None = None
    finite: MeshAxis | None = None  # an inferred axis that does not grow with width


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh a run is sharded over (docs/sharding.md); all sizes 1: no mesh at all.

    A size of -1 takes every device the other axes leave. With several hosts,
    `distributed` starts jax.distributed before the first JAX operation: auto when the
    environment says so (SLURM with several tasks, a TPU pod, JAX_COORDINATOR_ADDRESS) or a
    coordinator is set here, on always (JAX detects the cluster), off never.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    rules: ShardingRules = ShardingRules()
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    param: ParamConfig = ParamConfig()
    optim: OptimizerConfig = AdamWConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    sweep: SweepConfig = SweepConfig()
    init: InitConfig = InitConfig()
    mesh: MeshConfig = MeshConfig()


def _coerce(field: str, value: Any, annotation: Any) -> Any:
    """Checks one leaf against its annotation (a Literal: one of its values); ints are accepted
    where floats are expected."""
    options = typing.get_args(annotation)
    if type(None) in options:  # an optional field
        if value is None:
            return None
        (annotation,) = (t for t in options if t is not type(None))
        options = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        if isinstance(value, str) and value in options:
            return value
        raise ConfigError(field, value, f"one of {list(options)}")
    if set(options) == {int, bool}:  # jax's `unroll`: a count, or true for all
        if isinstance(value, int):
            return value
        raise ConfigError(field, value, "an integer or true/false")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, value, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(field, value, "an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(field, value, "a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, value, "a string")
    raise TypeError(f"unsupported annotation {annotation} for {field}")


def _optimizer_class(values: Mapping[str, Any]) -> type[OptimizerConfig]:
    """The config class of the optimizer named in `values` (AdamW when none is named)."""
    name = values.get("name", RunConfig.optim.name)
    _require(name in OPTIMIZERS, "optim.name", name, f"one of {list(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if cls is OptimizerConfig:
        cls = _optimizer_class(values)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            if issubclass(cls, OptimizerConfig):
                raise ConfigError(f"{prefix}{key}", values[key], expected_field(cls.name))
            raise ConfigError(f"{prefix}{key}", values[key], f"one of the fields {sorted(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = values[f.name]
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{prefix}{f.name}", sub, "a config group")
            kwargs[f.name] = _build(hint, sub, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(f"{prefix}{f.name}", values[f.name], hint)
    return cls(**kwargs)


def _check_fields(cfg: Any, prefix: str) -> None:
    """Every leaf of a config (built from a dict or in Python) against its annotation."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{prefix}{f.name}.")
        else:
            _coerce(f"{prefix}{f.name}", value, hints[f.name])


def _require(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(field, value, expected)


def _raise_first(problems: Iterator[Problem]) -> None:
    problem = next(problems, None)
    if problem is not None:
        raise ConfigError(*problem)


def validate(cfg: RunConfig) -> RunConfig:
    """Raises ConfigError on the first bad field; returns cfg unchanged otherwise."""
    _check_fields(cfg, "")
    m, p, o, d, t, lg = cfg.model, cfg.param, cfg.optim, cfg.data, cfg.train, cfg.logging
    for name in ("width", "depth", "head_dim", "mlp_ratio", "context"):
        _require(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "a positive integer")
    if m.factory is not None:
        try:
            load_factory(m.factory)
        except (ValueError, TypeError) as error:
            raise ConfigError("model.factory", m.factory, str(error).split(": ", 1)[1]) from None
        _require(o.needs_gradient, "optim.name", o.name, "a gradient optimizer with "
                 "model.factory (MeZO's step perturbs a model's layers lazily, which a "
                 "factory model does not expose)")
    if m.kind == "transformer":
        _require(m.width % m.head_dim == 0, "model.width", m.width,
                 f"a multiple of model.head_dim={m.head_dim}")
        _require(m.q_per_kv > 0 and (m.width // m.head_dim) % m.q_per_kv == 0, "model.q_per_kv",
                 m.q_per_kv, f"a positive divisor of the {m.width // m.head_dim} heads of "
                 f"model.width={m.width} (query heads per key/value head)")
        _require((p.base_width // m.head_dim) % m.q_per_kv == 0, "param.base_width",
                 p.base_width, f"a multiple of {m.q_per_kv * m.head_dim}: model.q_per_kv="
                 f"{m.q_per_kv} query heads of model.head_dim={m.head_dim} per key/value head")
    else:
        _raise_first(_transformer_only(m))
    if m.tie_embeddings:
        _require(m.readout_init == "normal", "model.readout_init", m.readout_init,
                 "normal with model.tie_embeddings=true (the tied readout is the embedding, "
                 "initialized as an embedding)")
        _require(not p.scheme.readout_on_sphere, "model.tie_embeddings", m.tie_embeddings,
                 f"false with param.name={p.name} (its readout lives on a sphere; a tied readout "
                 "is the embedding, which the sphere does not hold)")
    _require(m.embed_std > 0, "model.embed_std", m.embed_std, "a positive number")
    _require(m.scan_unroll is True or (m.scan_unroll is not False and m.scan_unroll >= 1),
             "model.scan_unroll", m.scan_unroll,
             "true (unroll every layer) or a positive integer (layers per scan iteration)")
    _require(p.name in SCHEMES, "param.name", p.name, f"one of {list(SCHEMES)}")
    if p.scheme.depth.scales_branches:
        _require(m.kind == "transformer", "model.kind", m.kind,
                 f"transformer with param.name={p.name} (its depth rule scales residual "
                 "branches, which the byte MLP does not have)")
    if p.scheme.readout_on_sphere or "output" in o.sphere_roles:
        why = f"param.name={p.name}" if p.scheme.readout_on_sphere else f"optim.name={o.name}"
        _require(m.readout_init == "normal", "model.readout_init", m.readout_init,
                 f"normal with {why} (the readout lives on a sphere, and a zero matrix has "
                 "none)")
    _require(p.base_width > 0, "param.base_width", p.base_width, "a positive integer")
    _require(p.base_depth > 0, "param.base_depth", p.base_depth, "a positive integer")
    for name in TUNABLE:
        value = getattr(p, name)
        _require(math.isfinite(value) and value > 0, f"param.{name}", value,
                 "a positive finite multiplier (1: the table alone)")
    if m.kind == "transformer":
        _require(p.base_width % m.head_dim == 0, "param.base_width", p.base_width,
                 f"a multiple of model.head_dim={m.head_dim}")
    # a bad train.steps is reported as itself, not as a warmup that is too long for it
    _require(t.steps > 0, "train.steps", t.steps, "a positive integer")
    _raise_first(o.problems(t.steps))
    _require(d.vocab_size > 1, "data.vocab_size", d.vocab_size, "an integer above 1")
    if d.holds_tokens:
        _require(d.tokenizer == "bytes", "data.tokenizer", d.tokenizer,
                 f"bytes (the default) with a {Path(d.path).suffix} file, which holds tokens "
                 "already")
    if d.tokenizer == "bpe":
        low, high = BPE_VOCAB_RANGE
        _require(low <= d.vocab_size <= high, "data.vocab_size", d.vocab_size,
                 f"{low} to {high} with data.tokenizer=bpe (the 256 byte symbols and 256 merges "
                 "at least; uint16 token ids)")
    elif d.tokenizer != "bytes":
        tokenizer_file_vocab(d.tokenizer)  # a missing or unreadable file fails here
    if d.path is not None:
        _require(d.packages == "all", "data.packages", d.packages,
                 "'all' when data.path is set (the halves split the standard library, "
                 "data.path=null; data=default selects all)")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                 "log_every", "checkpoint_every"):
        _require(getattr(t, name) > 0, f"train.{name}", getattr(t, name), "a positive integer")
    _require(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
             f"a divisor of train.batch_size={t.batch_size} (equal micro-batches)")
    if t.grad_accum > 1:
        _require(o.needs_gradient, "train.grad_accum", t.grad_accum,
                 f"1 with optim.name={o.name} (it steps from loss values, not accumulated "
                 "gradients)")
    _require(t.seed >= 0, "train.seed", t.seed, "a non-negative integer")
    _require(lg.spectral_every >= 0, "logging.spectral_every", lg.spectral_every,
             "a non-negative integer (steps between spectral logs; 0: off)")
    _validate_sweep(cfg.sweep)
    _validate_mesh(cfg.mesh)
    if cfg.init.from_run is not None:
        _require(cfg.init.from_run.strip() != "", "init.from_run", cfg.init.from_run,
                 "a finished run's directory, or null for a fresh initialization")
    return cfg


def _transformer_only(m: ModelConfig) -> Iterator[Problem]:
    """The modern block's options, set on a model that has no such block."""
    defaults = ModelConfig()
    for name in BLOCK_OPTIONS:
        if getattr(m, name) != getattr(defaults, name):
            yield (f"model.{name}", getattr(m, name),
                   f"{getattr(defaults, name)!r} with model.kind={m.kind} (a Transformer option)")


def _validate_mesh(m: MeshConfig) -> None:
    """What can be checked without the devices (scaling/sharding.py checks the rest)."""
    for axis in MESH_AXES:
        size = getattr(m, axis)
        _require(size >= 1 or size == -1, f"mesh.{axis}", size,
                 "a positive number of devices, or -1 for every device the other axes leave")
    _require([getattr(m, axis) for axis in MESH_AXES].count(-1) <= 1, "mesh",
             {axis: getattr(m, axis) for axis in MESH_AXES}, "at most one axis of size -1")
    if m.num_processes is not None:
        _require(m.num_processes >= 1, "mesh.num_processes", m.num_processes,
                 "a positive integer, or null (from the environment)")
    if m.process_id is not None:
        _require(m.process_id >= 0 and (m.num_processes is None or m.process_id < m.num_processes),
                 "mesh.process_id", m.process_id,
                 f"an integer in [0, mesh.num_processes={m.num_processes})")


def _validate_sweep(s: SweepConfig) -> None:
    if (s.log2_lr_min is None) != (s.log2_lr_max is None):
        missing = "sweep.log2_lr_max" if s.log2_lr_max is None else "sweep.log2_lr_min"
        _require(False, missing, None, "a number: an LR grid needs both ends")
    if s.log2_lr_min is not None:
        _require(s.log2_lr_min <= s.log2_lr_max, "sweep.log2_lr_max", s.log2_lr_max,
                 f"at least sweep.log2_lr_min={s.log2_lr_min}")
    _require(s.log2_lr_step > 0, "sweep.log2_lr_step", s.log2_lr_step,
             "a positive number of octaves")
    _require(s.vectorize_lr >= 1, "sweep.vectorize_lr", s.vectorize_lr, "a positive integer")
    _require(math.isfinite(s.multiplier) and s.multiplier > 0, "sweep.multiplier", s.multiplier,
             "a positive finite multiplier")
    if s.vectorize_lr > 1:
        _require(s.log2_lr_min is not None, "sweep.vectorize_lr", s.vectorize_lr,
                 "1 unless sweep.log2_lr_min/max define an LR grid to vectorize over")


def lr_grid(s: SweepConfig) -> list[float]:
    """The grid's learning rates, low to high; empty when the sweep has no grid."""
    if s.log2_lr_min is None:
        return []
    count = math.floor((s.log2_lr_max - s.log2_lr_min) / s.log2_lr_step + 1e-9) + 1
    return [2.0 ** (s.log2_lr_min + i * s.log2_lr_step) for i in range(count)]


def from_dict(values: Mapping[str, Any]) -> RunConfig:
    """Builds and validates a RunConfig from plain nested dicts (e.g. a resolved Hydra config)."""
    return validate(_build(RunConfig, values, ""))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
