"""06_submission end to end with params/ci.yaml, after the runs that 02_baseline and 05_accuracy leave behind."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sccsdxl import submission as S
from test_submission import fake_checker, git, prepared

pytestmark = pytest.mark.notebook


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_notebook_builds_checks_packs_runs_the_checker_and_pushes(tmp_path, run_notebook):
    prepared(tmp_path / "output")  # what 02_baseline and 05_accuracy leave behind (a fake model keeps it fast)
    checker = fake_checker(tmp_path / "inference")
    bare = tmp_path / "fork.git"
    git("init", "--quiet", "--bare", str(bare))
    _, output_dir = run_notebook("06_submission", submitter="CI Team/..", checker_path=str(checker),
                                 push_repo=str(bare), system_overrides={"cooling": "air"})
    record = json.loads((output_dir / "06_submission.json").read_text())
    assert record["submitter"] == "CI_Team" and record["division"] == "open" and record["round"] == "v4.1"
    assert record["check"]["ok"] and record["unpacked_check_ok"] is True
    assert record["checker"]["passed"] and record["push"]["pushed"]
    files = record["files"]
    for key in ("tarball", "run_script", "report", "check"):
        assert Path(files[key]).is_file(), key
    assert Path(record["submission_dir"]).parent == output_dir / "submissions"
    assert any("is written as 'CI_Team'" in note for note in record["notes"])
    desc = json.loads((Path(record["root"]) / "systems" / f"{record['system_id']}.json").read_text())
    assert desc["cooling"] == "air"
    pushed = git("--git-dir", str(bare), "ls-tree", "-r", "--name-only", S.DEFAULT_BRANCH).split()
    assert f"open/CI_Team/systems/{record['system_id']}.json" in pushed
    script = Path(files["run_script"]).read_text()
    assert "notebooks/02_baseline.ipynb" in script and "notebooks/06_submission.ipynb" in script
    subprocess.run(["bash", "-n", files["run_script"]], check=True)


def test_missing_runs_stop_the_notebook_with_the_list(tmp_path, run_notebook):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook("06_submission", submitter="Team")
    text = str(err.value)
    assert "MissingResultsError" in text and "02_baseline.ipynb" in text and "05_accuracy.ipynb" in text
    assert not (tmp_path / "output" / "submissions").exists()
