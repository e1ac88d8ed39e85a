"""The README's examples run as written."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_losses_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    runpy.run_path(str(script), run_name="__main__")
    values = [float(v) for v in capsys.readouterr().out.split()]
    assert len(values) == 3 and all(v > 0 for v in values)


def test_readme_names_only_shipped_configs():
    shipped = {p.stem for p in (README.parent / "src/dscl/configs").glob("*.yaml")}
    named = set(re.findall(r"--config ([a-z0-9_]+)(?![.\w])", README.read_text()))
    assert named and named <= shipped, named - shipped
