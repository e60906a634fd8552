"""The README's quickstart runs as written (docs that tell the truth)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_block_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README has a python quickstart"
  exec(compile(blocks[0], "README.md", "exec"), {})
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 6   # three methods x (adamw, muon)
  assert out[0].startswith("alpha_hill") and "'embed_tokens': 5.0" in out[0]
  assert out[2].startswith("relative") and "'embed_tokens': 5.0" in out[2]


def test_ci_runs_the_readme_test_command():
  readme = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  commands = [l.strip() for l in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)]
  test_cmd = next(c for c in commands if "pytest" in c)
  assert test_cmd in ci.splitlines()
