"""The README's library example runs exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == [
        "make demo",
        "make test",
    ]


def test_readme_library_example_runs_and_learns():
    code = python_blocks()[0]
    assert len(code.strip().splitlines()) < 10
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    plast = scope["plast"]
    assert plast.counters["applied"] == 3  # epoch 1 applies the fitted gate on 3 steps
    assert all(fit["records"] == 3 * 32 for fit in plast.gate_summary().values())
    assert all(m["dw_abs_mean"] > 0 for m in plast.last_metrics().values())
