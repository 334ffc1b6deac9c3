"""`scaling-sample`: text from a finished run, continued from a prompt by its newest checkpoint.

    scaling-sample RUN_DIR                        # 200 tokens after "def " at temperature 0.8
    scaling-sample RUN_DIR "import " 100 0        # 100 tokens, greedy

The prompt and its continuation go to stdout; a first line on stderr names the run, the
checkpoint's step and the tokenizer. Errors (a run that did not finish, no checkpoint, its
tokenizer not found, n_tokens ≤ 0, a negative temperature) are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.cli import OneLineParser, fail
from scaling.config import ConfigError
from scaling.training.sampling import Sampling, load, sample

PROG = "scaling-sample"


def _parser() -> argparse.ArgumentParser:
    default = Sampling()
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a finished run's directory (result.json, checkpoints/)")
    parser.add_argument("prompt", nargs="?", default=default.prompt,
                        help=f"the text to continue (default {default.prompt!r})")
    parser.add_argument("n_tokens", nargs="?", type=int, default=default.n_tokens,
                        help=f"tokens to generate (default {default.n_tokens})")
    parser.add_argument("temperature", nargs="?", type=float, default=default.temperature,
                        help=f"0: greedy, the most likely token (default {default.temperature})")
    parser.add_argument("--seed", type=int, default=default.seed,
                        help=f"the draws' random seed (default {default.seed})")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        sampling = Sampling(args.prompt, args.n_tokens, args.temperature, args.seed)
        model = load(args.run_dir)
        print(f"{PROG}: {model.run_dir} at checkpoint step {model.step}, tokenizer "
              f"{model.codec.name}, context {model.context} tokens", file=sys.stderr, flush=True)
        text = sample(model, sampling)
    except ConfigError as error:
        fail(PROG, error)
    print(text)


if __name__ == "__main__":
    main()
