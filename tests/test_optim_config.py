"""One config per optimizer family: Hydra's option and the dataclass are one set of defaults,
and a field the chosen optimizer does not have is a one-line error naming both."""

from __future__ import annotations

import dataclasses
import sys
from importlib import resources

import pytest
import yaml
from synthetic import assert_one_line_cli_error

import experiments.train
import optim
from experiments.compose import compose, group_options, to_run_config
from optim import OPTIMIZERS, AdamWConfig, MeZOConfig, MuonConfig, SGDConfig, optimizer_config
from scaling.config import (
    ConfigError,
    ModelConfig,
    ParamConfig,
    RunConfig,
    from_dict,
    to_dict,
    validate,
)
from scaling.parametrization import build_optimizer, make_parametrization
from scaling.steps.backprop import optimizer_at


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hydra_option_composes_to_exactly_the_dataclass_defaults(name):
    """`optim=NAME` trains `OPTIMIZERS[NAME]()`: same fields, in the same order, same values."""
    composed = to_run_config(compose([f"optim={name}"]))
    assert composed.optim == OPTIMIZERS[name]()
    assert type(composed.optim) is OPTIMIZERS[name]
    text = (resources.files("configs") / "optim" / f"{name}.yaml").read_text()
    fields = [f.name for f in dataclasses.fields(OPTIMIZERS[name])]
    assert list(yaml.safe_load(text)) == fields  # nothing extra, nothing missing


def test_every_optim_option_is_an_optimizer_family():
    assert group_options("optim") == sorted(OPTIMIZERS)


def test_python_defaults_are_the_command_lines():
    """MuonConfig() needs no spelled-out defaults to equal `optim=muon` (momentum 0.95,
    Nesterov, AdamW roles at half the LR), and RunConfig() is `scaling-train` with no overrides."""
    muon = MuonConfig()
    assert (muon.momentum, muon.nesterov, muon.adam_lr_ratio, muon.lr) == (0.95, True, 0.5, 0.02)
    assert RunConfig(optim=muon) == to_run_config(compose(["optim=muon"]))
    assert to_run_config(compose([])) == RunConfig()


@pytest.mark.parametrize(("name", "field", "value"), [
    ("adamw", "ns_steps", 3), ("adamw", "momentum", 0.9), ("sgd", "b1", 0.9),
    ("muon", "auon_hybrid", True), ("auon", "ns_scheme", "jordan"), ("sgd", "n_probes", 2),
    ("adamw", "sparsity", 0.5), ("mezo", "momentum", 0.9)])
def test_a_field_of_another_optimizer_is_a_clear_error(name, field, value):
    with pytest.raises(ConfigError) as error:
        from_dict({"optim": {"name": name, field: value}})
    message = str(error.value)
    assert message.startswith(f"optim.{field}={value!r}: expected a field of optim={name}")
    assert "\n" not in message
    with pytest.raises(ValueError, match=f"optim.{field}=.*optim={name}"):
        optimizer_config(name, **{field: value})


@pytest.mark.parametrize(("overrides", "named"), [
    (["optim.ns_steps=3"], ["optim.ns_steps=3", "optim=adamw"]),
    (["+optim.ns_steps=3"], ["optim.ns_steps=3", "optim=adamw"]),
    (["optim.auon_hybrid=true", "optim=muon"], ["optim.auon_hybrid=True", "optim=muon"]),
    (["optim=auon", "optim.ns_scheme=jordan"], ["optim.ns_scheme='jordan'", "optim=auon"])])
def test_cli_names_the_field_and_the_optimizer(overrides, named, tiny_run, tmp_path, capsys,
                                                monkeypatch):
    """The chosen optimizer is named wherever it was chosen on the command line."""
    monkeypatch.setattr(sys, "argv", ["scaling-train"])
    assert_one_line_cli_error(experiments.train.main, [*tiny_run, *overrides], capsys,
                              "scaling-train", named, tmp_path)


def test_family_fields_are_validated():
    """Each family's own fields are checked by the same one-line errors."""
    cases = [(MuonConfig(ns_steps=0), "optim.ns_steps"),
             (SGDConfig(momentum=1.0), "optim.momentum"), (AdamWConfig(b2=1.5), "optim.b2"),
             (MuonConfig(update_scale="x"), "optim.update_scale")]
    for optim_cfg, field in cases:
        with pytest.raises(ConfigError, match=f"^{field}="):
            from_dict({**to_dict(RunConfig()), "optim": dataclasses.asdict(optim_cfg)})


def test_a_config_class_must_match_its_name():
    """name is data in the run's hash: an AdamWConfig calling itself muon is refused."""
    with pytest.raises(ConfigError, match="optim.name='muon'"):
        validate(RunConfig(optim=AdamWConfig(name="muon")))


# (changed MeZOConfig fields, the field the error names, words of what it expects)
MEZO_ERRORS = [
    ({"eps": 0.0}, "optim.eps", "positive"), ({"eps": -1e-3}, "optim.eps", "positive"),
    ({"n_probes": 0}, "optim.n_probes", "positive integer"),
    ({"sparsity": 1.0}, "optim.sparsity", "[0, 1)"), ({"sparsity": -0.1}, "optim.sparsity", "[0, 1)"),
    ({"probe_scaling": "matchd"}, "optim.probe_scaling", "['isotropic', 'matched']"),
    ({"update_scaling": "mup"}, "optim.update_scaling", "['isotropic', 'matched']"),
    ({"eps_scaling": "fanin"}, "optim.eps_scaling", "['constant', 'fan_in']"),
    ({"param_dtype": "float16"}, "optim.param_dtype", "['float32', 'bfloat16']"),
    ({"objective": "acuracy"}, "optim.objective", "['cross_entropy', 'accuracy']"),
    ({"curvature": True, "curvature_decay": 1.0}, "optim.curvature_decay", "[0, 1)"),
    ({"safe_lr": 0.1}, "optim.safe_lr", "optim.curvature=true"),
    ({"safe_lr": 0.0, "curvature": True}, "optim.safe_lr", "positive")]


@pytest.mark.parametrize(("fields", "field", "expected"), MEZO_ERRORS,
                         ids=[f"{f}={v[f.removeprefix('optim.')]}" for v, f, _ in MEZO_ERRORS])
def test_mezo_fields_are_validated(fields, field, expected):
    """Each bad MeZO value is one line naming the field, its value and what it must be."""
    with pytest.raises(ConfigError) as error:
        from_dict({**to_dict(RunConfig()), "optim": dataclasses.asdict(MeZOConfig(**fields))})
    message = str(error.value)
    value = fields[field.removeprefix("optim.")]
    assert message.startswith(f"{field}={value!r}: expected "), message
    assert expected in message and "\n" not in message, message


def test_mezo_options_compose_from_the_command_line():
    """Every MeZO option set on the command line reaches MeZOConfig and validates."""
    cfg = to_run_config(compose([
        "optim=mezo", "optim.eps=0.01", "optim.n_probes=4", "optim.sparsity=0.8",
        "optim.probe_scaling=matched", "optim.update_scaling=matched", "optim.eps_scaling=fan_in",
        "optim.param_dtype=bfloat16", "optim.objective=accuracy", "optim.curvature=true",
        "optim.safe_lr=0.5"]))
    assert cfg.optim == MeZOConfig(
        eps=0.01, n_probes=4, sparsity=0.8, probe_scaling="matched", update_scaling="matched",
        eps_scaling="fan_in", param_dtype="bfloat16", objective="accuracy", curvature=True,
        safe_lr=0.5)


def test_gradient_optimizer_builders_refuse_mezo():
    """MeZO is not a gradient transformation: optim.build_optimizer, the parametrization's
    build_optimizer and optimizer_at refuse it, pointing to the MeZO step and zo_gradient."""
    parametrization = make_parametrization(ModelConfig(width=32, depth=2, head_dim=8),
                                           ParamConfig(), 64)
    message = r"optim.name='mezo' is zeroth-order.*MeZO step.*optim.zo_gradient"
    with pytest.raises(ValueError, match=message):
        optim.build_optimizer(MeZOConfig(), parametrization.labels(),
                              parametrization.optimizer_multipliers(MeZOConfig()),
                              total_steps=10)
    with pytest.raises(ValueError, match=message):
        build_optimizer(MeZOConfig(), parametrization, total_steps=10)
    with pytest.raises(ValueError, match=message):
        optimizer_at(MeZOConfig(), parametrization, total_steps=10)(1e-3)


def test_default_warmup_fits_a_run_of_any_length():
    """Warmup defaults to 5% of the steps (rounded down): a 10-step run validates with none, a
    300-step run gets 15; the schedule reaches its peak right after; an explicit warmup_steps
    wins and must stay below train.steps."""
    ten = to_run_config(compose(["train.steps=10"]))
    assert ten.optim.warmup_steps is None and ten.optim.warmup_for(10) == 0
    assert AdamWConfig().warmup_for(300) == 15
    lr_at = optim.learning_rate(dataclasses.replace(AdamWConfig(), schedule="constant"), 300)
    assert float(lr_at(14)) < AdamWConfig().lr == pytest.approx(float(lr_at(15)))
    assert AdamWConfig(warmup_steps=7).warmup_for(300) == 7
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=20: expected a non-negative "
                                          r"integer below train.steps=20, or null"):
        to_run_config(compose(["train.steps=20", "optim.warmup_steps=20"]))
    with pytest.raises(ConfigError, match=r"optim.warmup_fraction=1.0: expected a value in "):
        to_run_config(compose(["optim.warmup_fraction=1"]))
