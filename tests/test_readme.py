"""The README's examples must run as written: every Python block, and the command-line block top to bottom."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def _cli_block() -> str:
    section = README.read_text().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "README's Command line section has no bash block"
    return block.group(1)


@pytest.mark.realdata
def test_readme_cli_block_runs_top_to_bottom(tmp_path):
    """Exactly the README's commands, in a fresh folder, with the installed ``segcal`` and ``torchrun``."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "SEGCAL_DATA": str(Path(os.environ["SEGCAL_DATA"]).resolve())}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    script = "set -euo pipefail\n" + _cli_block()
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, f"README command failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert (tmp_path / "results" / "index.html").is_file()
    assert (tmp_path / "test.json").read_text() and (tmp_path / "test_ts.json").read_text()
    assert len(list((tmp_path / "scores").glob("*.npy"))) == 4
