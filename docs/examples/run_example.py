"""Trains an example under μP + Muon at a width far from its base: the user code the examples
need, all of it. `python docs/examples/run_example.py vit 256` (from the repository root)."""

import sys

from flax import nnx

from optim import MuonConfig
from scaling.any_model import build_optimizer, make_train_step, parametrize


def train(example, width: int = 256, base_width: int = 64, steps: int = 100,
          lr: float = 2**-5, batch: int = 64, scheme: str = "mup") -> list[float]:
    """The training losses of `example` (a module with MODEL, data and loss_fn)."""
    model, parametrization = parametrize(example.MODEL, scheme=scheme, width=width,
                                         base_width=base_width)
    tx = build_optimizer(MuonConfig(lr=lr, warmup_steps=steps // 10), parametrization,
                         total_steps=steps)
    graphdef, state = nnx.split(model)
    step = make_train_step(graphdef, tx, example.loss_fn)
    params = state.to_pure_dict()
    opt_state = tx.init(params)
    x, y = example.data(steps * batch)  # fresh samples at every step
    losses = []
    for t in range(0, steps * batch, batch):
        params, opt_state, loss = step(params, opt_state, x[t:t + batch], y[t:t + batch])
        losses.append(float(loss))
    return losses


if __name__ == "__main__":
    import importlib

    name, width = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256
    module = importlib.import_module({"mlp": "mlp_teacher"}.get(name, name))
    losses = train(module, width)
    print(f"{name} at width {width} under μP + Muon: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
