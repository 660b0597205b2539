"""A plain 2-task CPU job through a real Slurm: both ranks run and see their SLURM_PROCID."""
import re

import pytest
from slurm_utils import job_output, require_slurm, submit, wait_for

SCRIPT = """#!/bin/bash
#SBATCH --job-name=smoke
srun bash -c 'echo "rank PROCID=$SLURM_PROCID NTASKS=$SLURM_NTASKS SMOKE=$SMOKE_TAG"'
"""


@pytest.mark.multiproc
@pytest.mark.slurm
def test_two_task_job_sees_both_ranks(tmp_path):
    require_slurm()
    script = tmp_path / "smoke.sbatch"
    script.write_text(SCRIPT)
    out = tmp_path / "smoke-%j.out"
    job = submit(script, ["--nodes=1", "--ntasks-per-node=2", f"--output={out}", "--time=2"],
                 env={"SMOKE_TAG": "abc"})
    assert wait_for(job, timeout=120) == "COMPLETED"
    text = job_output(str(out).replace("%j", job))
    ranks = re.findall(r"rank PROCID=(\d+) NTASKS=(\d+) SMOKE=(\w*)", text)
    assert sorted(r[0] for r in ranks) == ["0", "1"], text
    assert {r[1] for r in ranks} == {"2"} and {r[2] for r in ranks} == {"abc"}
