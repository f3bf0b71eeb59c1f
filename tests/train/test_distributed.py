"""Multi-process start-up: the decision table (pure) and a real 2-process run on localhost."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from genesis_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(environ, *args, tpu_chips=0, **kwargs):
  return distributed.plan(*args, environ=environ, tpu_chips=lambda: tpu_chips, **kwargs)


def test_plain_run_is_single_process():
  d = _plan({})
  assert d["multi_process"] is False and d["source"] == "single" and d["num_processes"] == 1


def test_explicit_arguments_win_over_env():
  d = _plan({"GENESIS_COORDINATOR": "other:1", "GENESIS_NUM_PROCESSES": "8",
             "GENESIS_PROCESS_ID": "5"}, "10.0.0.1:1234", 2, 1)
  assert d["source"] == "explicit"
  assert (d["coordinator_address"], d["num_processes"], d["process_id"]) == ("10.0.0.1:1234", 2, 1)


def test_genesis_env_as_set_by_local_sh():
  d = _plan({"GENESIS_COORDINATOR": "localhost:5000", "GENESIS_NUM_PROCESSES": "4",
             "GENESIS_PROCESS_ID": "3", "GENESIS_LOCAL_DEVICE_IDS": "0,1"})
  assert d["multi_process"] and d["source"] == "env"
  assert (d["num_processes"], d["process_id"], d["local_device_ids"]) == (4, 3, [0, 1])
  assert d["cluster_detection_method"] == "deactivate"  # A stray SLURM env must not interfere.


def test_one_process_from_env_is_not_multi_process():
  d = _plan({"GENESIS_COORDINATOR": "localhost:5000", "GENESIS_NUM_PROCESSES": "1",
             "GENESIS_PROCESS_ID": "0"})
  assert d["multi_process"] is False


def test_kubernetes_indexed_job_takes_process_id_from_completion_index():
  d = _plan({"GENESIS_COORDINATOR": "genesis-0.genesis:1234", "GENESIS_NUM_PROCESSES": "4",
             "JOB_COMPLETION_INDEX": "2", "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
  assert d["source"] == "kubernetes" and d["process_id"] == 2 and d["multi_process"]
  assert _plan({"JOB_COMPLETION_INDEX": "2"})["multi_process"] is False  # Some other indexed Job.


@pytest.mark.parametrize("environ, message", [
    ({"GENESIS_COORDINATOR": "h:1", "GENESIS_PROCESS_ID": "0"}, "process count"),
    ({"GENESIS_NUM_PROCESSES": "2", "GENESIS_PROCESS_ID": "0"}, "coordinator address"),
    ({"GENESIS_COORDINATOR": "h:1", "GENESIS_NUM_PROCESSES": "2", "GENESIS_PROCESS_ID": "2"},
     "outside"),
    ({"GENESIS_COORDINATOR": "h", "GENESIS_NUM_PROCESSES": "2", "GENESIS_PROCESS_ID": "0"}, "port"),
    ({"GENESIS_NUM_PROCESSES": "two"}, "GENESIS_NUM_PROCESSES"),
    ({"GENESIS_DISTRIBUTED": "yes"}, "GENESIS_DISTRIBUTED"),
])
def test_incomplete_or_bad_settings_are_clear_errors(environ, message):
  with pytest.raises(distributed.DistributedConfigError, match=message):
    _plan(environ)


def test_slurm_multi_task_defers_to_jax_slurm_detection():
  slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[01-02]"}
  d = _plan(slurm)
  assert d["multi_process"] and d["source"] == "slurm" and d["cluster_detection_method"] == "slurm"
  assert d["num_processes"] is None and d["process_id"] is None  # JAX reads them from SLURM_*.
  assert _plan({**slurm, "SLURM_NTASKS": "1"})["multi_process"] is False
  assert d["local_device_ids"] is None  # One task per GPU: JAX picks GPU SLURM_LOCALID.
  per_node = _plan({**slurm, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
                    "SLURM_GPUS_ON_NODE": "8"})
  assert per_node["local_device_ids"] == list(range(8))  # One task per node drives all 8 GPUs.


def test_tpu_detection_and_switches():
  assert _plan({}, tpu_chips=4)["source"] == "tpu"
  assert _plan({"TPU_SKIP_MDS_QUERY": "1"}, tpu_chips=4)["multi_process"] is False
  gke = _plan({"TPU_WORKER_HOSTNAMES": "w-0,w-1", "TPU_WORKER_ID": "1"})
  assert gke["source"] == "tpu" and gke["cluster_detection_method"] == "gketpu"
  assert _plan({"OMPI_COMM_WORLD_SIZE": "4"})["source"] == "ompi"
  assert _plan({"GENESIS_DISTRIBUTED": "auto"})["source"] == "jax_auto"
  assert _plan({"GENESIS_DISTRIBUTED": "off", "SLURM_NTASKS": "8", "SLURM_PROCID": "0",
                "SLURM_STEP_NODELIST": "n1"}, tpu_chips=4)["multi_process"] is False


def test_count_tpu_chips_ignores_other_google_devices(tmp_path):
  # a, d: TPU v5e chips; b: Google's gVNIC network card; c: an NVIDIA GPU.
  for name, vendor, device in [("a", "0x1ae0", "0x0063"), ("b", "0x1ae0", "0x0042"),
                               ("c", "0x10de", "0x2330"), ("d", "0x1ae0", "0x0063")]:
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")
    (tmp_path / name / "device").write_text(device + "\n")
  assert distributed.count_tpu_chips(str(tmp_path)) == 2


def test_single_process_initialize_calls_nothing(monkeypatch):
  import jax
  for key in [k for k in os.environ if k.startswith(("GENESIS_", "SLURM_", "OMPI_", "TPU_"))]:
    monkeypatch.delenv(key)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *a, **k: pytest.fail("jax.distributed.initialize called"))
  assert distributed.initialize()["multi_process"] is False


_WORKER = textwrap.dedent("""
    import json
    from genesis_jax.train import distributed
    decision = distributed.initialize(initialization_timeout_s=30)  # before any other JAX call
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    # Rows of process p hold 100 * p + (0 .. 5): the global sum needs both processes' data.
    local = np.arange(jax.local_device_count() * 3, dtype=np.float32).reshape(-1, 3)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                               local + 100 * jax.process_index())
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print("RESULT", json.dumps(dict(
        source=decision["source"], collectives=decision["cpu_collectives"],
        runtime=distributed.describe_runtime(), global_shape=list(x.shape), total=float(total))))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_sum_a_global_array():
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "GENESIS_"))}
    env.update(GENESIS_COORDINATOR=f"127.0.0.1:{port}", GENESIS_NUM_PROCESSES="2",
               GENESIS_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               TPU_SKIP_MDS_QUERY="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  results = []
  for p in procs:
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out
    results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
  # Each process holds 2 devices x 3 values 0..5; process 1 adds 100 to its six: 2 * 15 + 600.
  for pid, r in enumerate(results):
    assert r["source"] == "env" and r["collectives"] == "gloo"
    assert r["global_shape"] == [4, 3] and r["total"] == 630.0
    assert r["runtime"].startswith(
        f"process {pid} of 2 | devices: 2 local, 4 global | platform cpu")


_FAILING_WORKER = textwrap.dedent("""
    import sys, time
    from genesis_jax.train import distributed
    distributed.initialize(initialization_timeout_s=30)
    import jax
    if jax.process_index() == 1:
      raise RuntimeError("worker 1 broke")  # Uncaught: the fail-fast excepthook ends it.
    if jax.process_index() == 2:
      distributed.exit_with_error("error: worker 2 has a bad config", code=3)
    time.sleep(120)  # Process 0 is busy (a long compile, say) and never reaches shutdown in time.
""")


def test_a_failing_process_exits_at_once_instead_of_waiting_in_the_shutdown_barrier():
  port = _free_port()
  procs = []
  for pid in range(3):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "GENESIS_"))}
    env.update(GENESIS_COORDINATOR=f"127.0.0.1:{port}", GENESIS_NUM_PROCESSES="3",
               GENESIS_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    procs.append(subprocess.Popen([sys.executable, "-c", _FAILING_WORKER], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    # Without the fail-fast exit, JAX keeps a failed process for its 300 s shutdown timeout.
    out1, _ = procs[1].communicate(timeout=60)
    out2, _ = procs[2].communicate(timeout=60)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate()
  assert procs[1].returncode == 1 and "RuntimeError: worker 1 broke" in out1
  assert procs[2].returncode == 3 and "error: worker 2 has a bad config" in out2
