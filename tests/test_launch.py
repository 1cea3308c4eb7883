"""launch/ scripts: bash syntax, usage errors, and the exact launcher command each builds (DRY_RUN=1),
with every extra argument passed through to `python -m train` as a Hydra override. The scripts are run
for real by tests/test_deepspeed.py (single_node.sh with 2 processes)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "deepspeed.sh", "slurm.sbatch"]
PASS = ["recipe=stage2_multitask", "data.root=/data/x y", "optim.lr=1e-5"]


def _run(script: str, args: list[str], env: dict[str, str] | None = None, dry: bool = True,
         cwd: Path = ROOT) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    e.update(PYTHON="/opt/py/bin/python", **(env or {}))
    if dry:
        e["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=30)


def _argv(p: subprocess.CompletedProcess) -> list[str]:
    assert p.returncode == 0, p.stderr
    return shlex.split(p.stdout.strip().splitlines()[-1])


def _tail_is_train(argv: list[str]) -> None:
    i = argv.index("train")
    assert argv[i - 1] == "-m" or argv[i - 1] == "--module"
    assert argv[i + 1:] == PASS  # overrides passed through unchanged (quoting kept)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_bash_with_usage(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and "usage:" in text
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


def test_single_node():
    argv = _argv(_run("single_node.sh", ["4", *PASS]))
    assert argv[:3] == ["/opt/py/bin/python", "-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc_per_node") + 1] == "4" and "--standalone" in argv
    _tail_is_train(argv)
    one = _argv(_run("single_node.sh", ["1", *PASS]))
    assert one == ["/opt/py/bin/python", "-m", "train", *PASS]
    bad = _run("single_node.sh", ["2", "optim.lr=1"])
    assert bad.returncode == 2 and "recipe=NAME" in bad.stderr
    assert _run("single_node.sh", []).returncode == 2


def test_multi_node_torchrun():
    env = {"NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "NPROC_PER_NODE": "8"}
    argv = _argv(_run("multi_node.sh", PASS, env))
    assert argv[argv.index("--nnodes") + 1] == "3" and argv[argv.index("--node_rank") + 1] == "2"
    assert argv[argv.index("--nproc_per_node") + 1] == "8"
    assert argv[argv.index("--rdzv_endpoint") + 1] == "10.1.2.3:29500"
    _tail_is_train(argv)
    missing = _run("multi_node.sh", PASS, {"NNODES": "3", "MASTER_ADDR": "h"})
    assert missing.returncode != 0 and "NODE_RANK" in missing.stderr


def test_deepspeed_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\nworker-1 slots=8\nworker-2 slots=8\n")
    argv = _argv(_run("deepspeed.sh", [str(hosts), *PASS]))
    assert argv[0] == "/opt/py/bin/deepspeed"
    assert argv[argv.index("--hostfile") + 1] == str(hosts)
    assert argv[argv.index("--master_addr") + 1] == "worker-1"
    _tail_is_train(argv)
    local = _argv(_run("deepspeed.sh", ["none", *PASS], {"NUM_GPUS": "2"}))
    assert local[local.index("--num_gpus") + 1] == "2" and "--hostfile" not in local
    gone = _run("deepspeed.sh", [str(tmp_path / "nope"), *PASS])
    assert gone.returncode == 2 and "not found" in gone.stderr


def test_slurm(tmp_path):
    # a stub `scontrol` that expands the node list the way SLURM does
    stub = tmp_path / "bin"
    stub.mkdir()
    # ... and then many more hosts: a reader that stops after the first line (head -n 1) would kill it with
    # SIGPIPE, which `set -o pipefail` turns into exit 141 (a race that large node lists make likely)
    (stub / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-017\\ngpu-018\\n'\n"
                                   "for i in $(seq 20000); do echo gpu-x$i; done\n")
    (stub / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT), "PATH": f"{stub}:{os.environ['PATH']}"}
    # sbatch runs a copy of the script from its spool directory: run it from elsewhere
    argv = _argv(_run("slurm.sbatch", PASS, env, cwd=tmp_path))
    assert argv[0] == "srun"
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--nproc_per_node") + 1] == "8"
    assert argv[argv.index("--rdzv_endpoint") + 1] == "gpu-017:29500"
    assert argv[argv.index("--rdzv_id") + 1] == "4242"
    _tail_is_train(argv)
    directives = [x for x in (LAUNCH / "slurm.sbatch").read_text().splitlines() if x.startswith("#SBATCH")]
    assert any("--ntasks-per-node=1" in d for d in directives)
