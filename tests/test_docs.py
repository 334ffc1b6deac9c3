"""The Python examples of README.md and docs/commands.md run as written, in order (a later one
may use an earlier one's names), and print what their comments say: the first number of a
print line's comment appears in its output. Examples that train for minutes or read a sweep
on disk are left to the commands they stand for (listed below)."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "docs" / "commands.md"]
# what an example calls that the suite covers elsewhere and that costs minutes or a sweep
NOT_RUN = ("train(", "train_lrs(", "load_results(")
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _examples() -> list[tuple[str, str]]:
    return [(path.name, code) for path in DOCS for code in FENCE.findall(path.read_text())]


def test_every_python_example_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    examples = _examples()
    run = [(name, code) for name, code in examples if not any(c in code for c in NOT_RUN)]
    assert len(run) >= 4, [name for name, _ in examples]
    namespace: dict = {}
    for name, code in run:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(code, name, "exec"), namespace)  # noqa: S102 (the docs' own code)
        for line in code.splitlines():
            comment = line.partition("#")[2] if line.lstrip().startswith("print(") else ""
            if match := NUMBER.search(comment):
                assert match.group() in output.getvalue(), (name, line, output.getvalue())
