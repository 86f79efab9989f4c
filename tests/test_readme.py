from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_cmd = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "set ", "cd ", "command -v chromium"))]
    assert len(ci_cmd) == 1 and f"```bash\n{ci_cmd[0]}\n```" in readme
    assert "```bash\npython3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e \".[viewers]\" && " \
           ".venv/bin/python run_all.py\n```" in readme
