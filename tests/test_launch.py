"""launch/: every script parses (`bash -n`), and its dry run prints the commands it would run."""
from __future__ import annotations

import os
import pathlib
import shlex
import stat
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "slurm.sbatch", "tpu_vm.sh", "k8s.sh"]
SOURCED = ["common.sh"]  # Helpers the scripts source.


def _run(script: str, *args: str, env: dict[str, str] | None = None, check: bool = True):
  full_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "GENESIS_", "TPU_", "GCP_", "DRY_RUN"))}
  full_env.update(env or {})
  proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, cwd=REPO,
                        capture_output=True, text=True, timeout=30)
  if check:
    assert proc.returncode == 0, proc.stderr + proc.stdout
  return proc


def _commands(stdout: str) -> list[list[str]]:
  """Lines that start with '+ ' (the printed commands), split as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS + SOURCED)
def test_scripts_parse_and_are_executable(script):
  path = LAUNCH / script
  subprocess.run(["bash", "-n", str(path)], check=True, timeout=10)
  if script in SCRIPTS:
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_reject_bad_usage(script):
  proc = _run(script, check=False)
  assert proc.returncode != 0
  assert "usage" in (proc.stdout + proc.stderr).lower()


def test_local_dry_run_wires_each_process():
  out = _run("local.sh", "-n", "3", "--port", "2222", "--cpu-devices", "2", "--dry-run", "--",
             "--config", "configs/pretrain_genesis.py", "--workdir", "runs/x a",
             "--config.train.batch_size=2").stdout
  lines = out.splitlines()
  assert lines[0] == r"mkdir -p runs/x\ a/launch_logs" and lines[-1] == "wait"
  for i, line in enumerate(lines[1:-1]):
    words = shlex.split(line)
    assert words[:7] == ["env", "GENESIS_COORDINATOR=127.0.0.1:2222", "GENESIS_NUM_PROCESSES=3",
                         f"GENESIS_PROCESS_ID={i}", "JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=2",
                         "python"]
    assert words[7:] == ["-m", "genesis_jax.main", "--config", "configs/pretrain_genesis.py",
                         "--workdir", "runs/x a", "--config.train.batch_size=2",
                         ">", f"runs/x a/launch_logs/process_{i}.log", "2>&1", "&"]
  assert len(lines) == 5


def test_local_dry_run_splits_gpus_and_keeps_bucket_logs_local():
  out = _run("local.sh", "-n", "2", "--gpus-per-process", "4", "--", "--workdir=gs://b/run",
             env={"DRY_RUN": "1"}).stdout
  assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in out and "CUDA_VISIBLE_DEVICES=4,5,6,7 " in out
  assert out.splitlines()[0] == "mkdir -p launch_logs"


def test_local_run_stops_everyone_when_one_process_fails(tmp_path):
  fake = tmp_path / "python"  # Stands in for the interpreter: reports its wiring, process 1 fails.
  # Process 1 fails only once the others have logged their wiring (no race under load); its
  # arguments are "-m genesis_jax.main --workdir DIR", so $4 is the workdir.
  fake.write_text(
      '#!/usr/bin/env bash\necho "id=$GENESIS_PROCESS_ID n=$GENESIS_NUM_PROCESSES $*"\n'
      'if [[ "$GENESIS_PROCESS_ID" == 1 ]]; then\n'
      '  for _ in $(seq 300); do\n'
      '    grep -q id= "$4/launch_logs/process_0.log" 2>/dev/null &&\n'
      '      grep -q id= "$4/launch_logs/process_2.log" 2>/dev/null && break\n'
      '    sleep 0.1\n'
      '  done\n'
      '  exit 7\n'
      'fi\n'
      'exec sleep 60\n')
  fake.chmod(0o755)
  proc = _run("local.sh", "-n", "3", "--", "--workdir", str(tmp_path / "run"),
              env={"PYTHON": str(fake)}, check=False)
  assert proc.returncode == 7, proc.stderr
  logs = tmp_path / "run" / "launch_logs"
  for i in range(3):
    assert (logs / f"process_{i}.log").read_text().startswith(
        f"id={i} n=3 -m genesis_jax.main --workdir {tmp_path / 'run'}")


def test_slurm_dry_run_prints_srun_over_all_gpus():
  out = _run("slurm.sbatch", "configs/pretrain_genesis.py", "/shared/runs/g",
             "--config.train.batch_size=4",
             env={"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "4", "GENESIS_VENV": "/opt/venv"}).stdout
  assert _commands(out) == [
      ["source", "/opt/venv/bin/activate"],
      ["mkdir", "-p", "/shared/runs/g"],
      ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
       "--cpu-bind=none", "python", "-m", "genesis_jax.main", "--config",
       "configs/pretrain_genesis.py", "--workdir", "/shared/runs/g", "--config.train.batch_size=4"]]


def test_slurm_header_matches_one_task_per_gpu():
  text = (LAUNCH / "slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  out = _run("slurm.sbatch", "--dry-run", "c.py", "gs://b/r",
             env={"SLURM_NNODES": "2", "GENESIS_GPUS_PER_NODE": "4"}).stdout
  [srun] = _commands(out)  # No mkdir for a bucket path.
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4"]


def test_tpu_vm_all_dry_run_creates_installs_runs_fetches_deletes():
  out = _run("tpu_vm.sh", "all", "--dry-run", "--name", "g1", "--zone", "us-west4-a",
             "--project", "proj", "--accelerator", "v5litepod-16", "--spot",
             "--config", "configs/pretrain_genesis.py", "--workdir", "gs://bkt/runs/g", "--",
             "--config.train.batch_size=4").stdout
  cmds = _commands(out)
  where = ["--zone=us-west4-a", "--project=proj"]
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "g1", *where,
                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert cmds[1][0] == "tar" and cmds[1][-1] == "."
  assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", cmds[1][-2],
                     "g1:genesis_jax-src.tar.gz", *where, "--worker=all"]
  assert cmds[3][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "g1", *where]
  assert cmds[3][8] == "--worker=all" and "pip install -q -e" in cmds[3][9]
  assert cmds[4] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "g1", *where, "--worker=all",
                     "--command=cd ~/genesis_jax && GENESIS_DISTRIBUTED=auto ~/genesis_venv/bin/python"
                     " -m genesis_jax.main --config configs/pretrain_genesis.py"
                     " --workdir gs://bkt/runs/g --config.train.batch_size=4"]
  assert cmds[5:] == [["mkdir", "-p", "results/g1"],
                      ["gcloud", "storage", "cp", "-r", "gs://bkt/runs/g", "results/g1/"],
                      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "g1", *where, "--quiet"]]


def test_tpu_vm_deletes_even_when_a_step_fails():
  proc = _run("tpu_vm.sh", "run,fetch,delete", "--name", "g2", "--workdir", "gs://b/r",
              env={"DRY_RUN": "1"}, check=False)  # `run` without --config fails.
  assert proc.returncode == 2 and "run needs --config" in proc.stderr
  cmds = _commands(proc.stdout)
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "g2"]
  assert ["gcloud", "storage", "cp", "-r", "gs://b/r", "results/g2/"] in cmds


def test_tpu_vm_detached_run_logs_on_each_worker():
  out = _run("tpu_vm.sh", "run", "--detach", "--config", "c.py", "--workdir", "gs://b/r",
             env={"DRY_RUN": "1", "TPU_NAME": "g3"}).stdout
  [ssh] = _commands(out)
  command = ssh[-1].removeprefix("--command=")
  assert command.startswith("nohup bash -c ") and command.endswith(" > ~/genesis_run.log 2>&1 < /dev/null &")
  inner = shlex.split(command)[3]
  assert inner.endswith("genesis_jax.main --config c.py --workdir gs://b/r")


K8S_EXAMPLE_ARGS = ["--name", "genesis", "--image", "registry.example.com/genesis_jax:latest",
                    "--hosts", "2", "--gpus", "8", "--config", "configs/pretrain_genesis.py",
                    "--workdir", "/runs/genesis", "--pvc", "genesis-runs"]


def test_k8s_example_manifest_is_what_the_script_renders():
  out = _run("k8s.sh", "render", *K8S_EXAMPLE_ARGS).stdout
  assert out == (LAUNCH / "k8s_job.example.yaml").read_text()


def test_k8s_dry_run_manifest_is_an_indexed_job_with_a_coordinator_service():
  yaml = pytest.importorskip("yaml")
  out = _run("k8s.sh", "apply", "--dry-run", "--name", "mg", "--namespace", "ml", "--image", "img:1",
             "--hosts", "4", "--gpus", "0", "--config", "c.py", "--workdir", "gs://b/r", "--",
             '--config.data.path=/d/"quoted" dir').stdout
  first, rest = out.split("\n", 1)
  assert first == "+ kubectl --namespace=ml apply -f -"
  service, job = yaml.safe_load_all(rest)
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  assert service["spec"]["selector"] == {"job-name": "mg"}
  spec = job["spec"]
  assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
  pod = spec["template"]["spec"]
  assert pod["subdomain"] == "mg"
  [container] = pod["containers"]
  assert container["args"] == ["--config", "c.py", "--workdir", "gs://b/r",
                               '--config.data.path=/d/"quoted" dir']
  env = {e["name"]: e["value"] for e in container["env"]}
  assert env == {"GENESIS_COORDINATOR": "mg-0.mg:1234", "GENESIS_NUM_PROCESSES": "4"}
  assert "resources" not in container  # --gpus 0: CPU pods.
  assert [v["name"] for v in pod["volumes"]] == ["dshm"]  # Bucket workdir: no volume claim.


def test_k8s_logs_and_delete_dry_run():
  assert _commands(_run("k8s.sh", "logs", "--dry-run", "--name", "mg").stdout) == [
      ["kubectl", "logs", "-f", "-l", "job-name=mg,batch.kubernetes.io/job-completion-index=0"]]
  assert _commands(_run("k8s.sh", "delete", "--name", "mg", env={"DRY_RUN": "1"}).stdout) == [
      ["kubectl", "delete", "job,service", "mg", "--ignore-not-found"]]


def test_tpu_vm_install_can_stage_data_on_every_worker():
  out = _run("tpu_vm.sh", "install", "--dry-run", "--name", "g4", "--stage-data", "gs://b/prepared").stdout
  assert _commands(out)[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "g4", "--zone=us-west4-a",
                                "--worker=all",
                                "--command=mkdir -p ~/data && gcloud storage cp -r gs://b/prepared ~/data/"]


def test_tpu_vm_fetches_a_relative_workdir_from_the_checkout_on_worker_0():
  out = _run("tpu_vm.sh", "fetch", "--dry-run", "--name", "g5", "--workdir", "runs/g").stdout
  assert _commands(out) == [["mkdir", "-p", "results/g5"],
                            ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                             "g5:genesis_jax/runs/g", "results/g5/", "--zone=us-west4-a", "--worker=0"]]
