"""μP and its relatives for a Flax NNX model this package did not write.

`parametrize(make, scheme=..., width=..., base_width=...)` builds the user's model at `width`,
infers every parameter's role from a base and a delta copy (scaling/inference.py), draws the
initial values the scheme asks for, sets the forward multipliers the model applies through the
helpers of models/multipliers.py, and returns the model with its Parametrization: the object the
project's own models get, so the optimizers (`build_optimizer`: every family, MeZO included), the
coordinate check (scaling.coord_check_any) and sharding work on it unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import jax
import optax
from flax import nnx

from models.multipliers import AttentionScale, BranchMultiplier, apply_runtime, multiplier_modules
from optim import OptimizerConfig, learning_rate, zo_gradient
from scaling.inference import infer_specs
from scaling.parametrization import Parametrization, draw_params
from scaling.parametrization import build_optimizer as parametrization_optimizer
from scaling.schemes import SCHEMES, Scheme
from scaling.steps.zeroth_order import probe_plan

ModelFn = Callable[..., nnx.Module]  # make(width) or make(width, depth) -> the model
# MeZO fields only the training step implements (optim/mezo.py's lazy step), at their defaults
ZO_OPTAX_DEFAULTS = {"sparsity": 0.0, "curvature": False, "safe_lr": None,
                     "param_dtype": "float32", "clip_norm": 0.0, "objective": "cross_entropy"}


def _scheme(scheme: str | Scheme) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: expected one of {list(SCHEMES)}")
    return SCHEMES[scheme]


def _builder(make: ModelFn, depth: int | None) -> Callable[[int, int | None], nnx.Module]:
    if depth is None:
        return lambda w, d: make(w)
    try:
        inspect.signature(make).bind(1, 1)
    except TypeError:
        raise ValueError("depth given: expected make(width, depth), a function that builds the "
                         "model at a depth too") from None
    return make


def _head_dim(model: nnx.Module) -> int:
    """The head dim of the model's AttentionScale helpers (1 with none); they must agree."""
    dims = {m.head_dim for _, m in multiplier_modules(model) if isinstance(m, AttentionScale)}
    if len(dims) > 1:
        raise ValueError(f"AttentionScale helpers with head dims {sorted(dims)}: expected one "
                         "head dim for every attention layer of a model")
    return dims.pop() if dims else 1


def infer_parametrization(make: ModelFn, *, scheme: str | Scheme = "mup", width: int,
                          base_width: int, delta_width: int | None = None,
                          depth: int | None = None, base_depth: int | None = None,
                          tuned: Mapping[str, float] | None = None) -> Parametrization:
    """The Parametrization of `make`'s model at `width` (and `depth`) against its base shape:
    roles inferred from the axes that differ between the base width and `delta_width` (by
    default another width: the target's, or twice the base's). Nothing is built but shapes."""
    if not all(isinstance(w, int) and w > 0 for w in (width, base_width)):
        raise ValueError(f"width={width}, base_width={base_width}: expected positive integers")
    delta_width = delta_width or (width if width != base_width else 2 * base_width)
    if delta_width == base_width:
        raise ValueError(f"delta_width={delta_width}: expected a width other than base_width="
                         f"{base_width} (the axes that differ are the ones that grow)")
    build = _builder(make, depth)
    base_depth = depth if base_depth is None else base_depth

    def shapes(w):  # at the model's own depth: depth rules read depths as numbers
        return nnx.eval_shape(lambda: build(w, depth))

    model, base, delta = shapes(width), shapes(base_width), shapes(delta_width)
    return Parametrization(_scheme(scheme), infer_specs(model, base, delta),
                           infer_specs(base, base, delta), _head_dim(model), _head_dim(base),
                           depth or 1, base_depth or 1, tuned)


def check_multipliers(model: nnx.Module, parametrization: Parametrization) -> None:
    """A depth rule needs the model to scale its residual branches: an error when it would and
    the model has no BranchMultiplier, or has no parameter marked residual."""
    if parametrization.branch_multiplier == 1.0:
        return
    helpers = [m for _, m in multiplier_modules(model) if isinstance(m, BranchMultiplier)]
    residual = [s for s in parametrization.specs.values() if s.residual]
    if not helpers or not residual:
        raise ValueError(
            f"param={parametrization.scheme.name} at depth {parametrization.depth} (base "
            f"{parametrization.base_depth}) multiplies residual branches by "
            f"{parametrization.branch_multiplier:.4g}: expected a model that applies "
            "models.multipliers.BranchMultiplier to each branch and marks its blocks with "
            "models.tagged.mark_residual (found "
            f"{len(helpers)} BranchMultiplier, {len(residual)} residual parameters)")


def initialize(model: nnx.Module, parametrization: Parametrization, seed: int = 0) -> nnx.Module:
    """Draws every parameter as the parametrization says (in place; returns the model): an
    inferred one afresh (zero, one, or a normal of its init std), a tagged one's unit draw
    rescaled to its std; and sets the forward multipliers."""
    draw_params(model, parametrization.specs, parametrization.init_std, jax.random.key(seed))
    check_multipliers(model, parametrization)
    apply_runtime(model, parametrization.runtime())
    return model


def parametrize(make: ModelFn, *, scheme: str | Scheme = "mup", width: int, base_width: int,
                delta_width: int | None = None, depth: int | None = None,
                base_depth: int | None = None, seed: int = 0,
                tuned: Mapping[str, float] | None = None
                ) -> tuple[nnx.Module, Parametrization]:
    """`make`'s model at `width` (and `depth`) under `scheme` ("sp", "mup", "depth_mup",
    "completep", "hyperp" or a Scheme), initialized at `seed`, with its Parametrization.

    `make(width)` (or `make(width, depth)`) builds the model; the base and delta copies are
    built as shapes only. `tuned`: per-role multipliers a proxy tuned (scaling.rules.TUNABLE)."""
    parametrization = infer_parametrization(
        make, scheme=scheme, width=width, base_width=base_width, delta_width=delta_width,
        depth=depth, base_depth=base_depth, tuned=tuned)
    model = _builder(make, depth)(width, depth)
    return initialize(model, parametrization, seed), parametrization


def _decay(plan, weight_decay: float) -> optax.GradientTransformation:
    """+ λ·(the leaf's weight-decay multiplier)·θ, as the MeZO step decays (vectors: none)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, p, probe: u + weight_decay * probe.weight_decay * p,
                            updates, params, plan), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: OptimizerConfig, parametrization: Parametrization, *,
                    total_steps: int, seed: int = 0) -> optax.GradientTransformation:
    """The optimizer `cfg` under the parametrization, for every family: a gradient family as
    scaling.parametrization.build_optimizer builds it; MeZO (a family that needs no gradient)
    as optim.zo_gradient with the run's probe plan, then SGD's per-leaf weight decay and
    schedule: update(grads or None, state, params, value_fn=loss of params)."""
    if cfg.needs_gradient:
        return parametrization_optimizer(cfg, parametrization, total_steps=total_steps)
    for field, default in ZO_OPTAX_DEFAULTS.items():
        if getattr(cfg, field) != default:
            raise ValueError(f"optim.{field}={getattr(cfg, field)!r}: expected {default!r} "
                             "for MeZO through optax (the training step's alone)")
    plan = probe_plan(parametrization, cfg)
    return optax.chain(zo_gradient(eps=cfg.eps, n_probes=cfg.n_probes, seed=seed, plan=plan),
                       _decay(plan, cfg.weight_decay),
                       optax.scale_by_learning_rate(learning_rate(cfg, total_steps)))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array], *,
                    gradient: bool = True):
    """A compiled step (params, opt_state, x, y) -> (params, opt_state, loss) on the pure-dict
    parameters of `nnx.split(model)`, for `loss_fn(model, x, y)`; `gradient=False` (MeZO)
    passes no gradient, only the loss as `value_fn`, so the loss need not be differentiable."""

    def loss_of(params, x, y):
        return loss_fn(nnx.merge(graphdef, params), x, y)

    @jax.jit
    def step(params, opt_state, x, y):
        if gradient:
            loss, grads = jax.value_and_grad(loss_of)(params, x, y)
        else:
            loss, grads = loss_of(params, x, y), None
        updates, opt_state = tx.update(grads, opt_state, params,
                                       value_fn=lambda p: loss_of(p, x, y))
        return optax.apply_updates(params, updates), opt_state, loss

    return step
