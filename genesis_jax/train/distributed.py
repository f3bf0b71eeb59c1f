"""Multi-process start-up: decide whether a run spans processes, then `jax.distributed.initialize`.

One code path for every launcher in launch/. The decision is read, in this order, from
  1. explicit arguments (coordinator, process count, process id);
  2. GENESIS_COORDINATOR / GENESIS_NUM_PROCESSES / GENESIS_PROCESS_ID (launch/local.sh, the
     Kubernetes Job, any hand-rolled launcher); in an indexed Kubernetes Job the process id may
     instead come from JOB_COMPLETION_INDEX;
  3. a cluster that JAX detects itself: SLURM (srun with SLURM_NTASKS > 1), Open MPI
     (mpirun with OMPI_COMM_WORLD_SIZE > 1), Cloud TPU VMs / pods (TPU chips on the PCI bus, or
     TPU_WORKER_HOSTNAMES on GKE);
  4. otherwise a single process, and nothing is called.
GENESIS_DISTRIBUTED=off forces 4; GENESIS_DISTRIBUTED=auto forces a bare
`jax.distributed.initialize()` (JAX's own detection, e.g. inside an MPI launcher it knows).
GENESIS_LOCAL_DEVICE_IDS="0,1" restricts the accelerators this process drives.

`initialize` must run before anything that creates a JAX backend (jax.devices, a jit call, an
array): `jax.distributed.initialize` refuses once a backend exists. Nothing here touches the
backend; `jax.config.update` only records a flag.
"""
from __future__ import annotations

import glob
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from genesis_jax import errors

# Google's PCI vendor id, and the device ids of TPU chips (v3 .. TPU7x). Other Google PCI
# devices exist on every GCE VM (the gVNIC network card), so the vendor alone is not enough.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


class DistributedConfigError(errors.EnvironmentSetupError, ValueError):
  """The multi-process settings are incomplete or contradict each other (still a ValueError, as
  it was before the errors module)."""


def count_tpu_chips(sysfs: str = "/sys/bus/pci/devices") -> int:
  """TPU chips attached to this host, read from sysfs (no JAX call, no network)."""
  chips = 0
  for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
    try:
      if pathlib.Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
        continue
      device = pathlib.Path(os.path.dirname(vendor), "device").read_text().strip()
    except OSError:
      continue
    chips += device in _TPU_PCI_DEVICES
  return chips


def _int_env(environ: Mapping[str, str], key: str) -> int | None:
  value = environ.get(key)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(
        f"Environment variable {key}={value!r} is not an integer.") from None


def _device_ids(value: Any) -> list[int] | None:
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return [value]
  if isinstance(value, str):
    try:
      return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
      raise DistributedConfigError(
          f"GENESIS_LOCAL_DEVICE_IDS={value!r}: expected comma-separated integers like '0,1'."
      ) from None
  return [int(v) for v in value]


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
         environ: Mapping[str, str] | None = None,
         tpu_chips: Callable[[], int] = count_tpu_chips) -> dict[str, Any]:
  """Decides how this process starts, from arguments and the environment only (pure; no JAX).

  Returns a dict with `multi_process` (bool), `source` (where the decision came from: explicit,
  env, kubernetes, slurm, ompi, tpu, jax_auto, single, off) and the arguments for
  `jax.distributed.initialize` (`coordinator_address`, `num_processes`, `process_id`,
  `local_device_ids`, `cluster_detection_method`); None means "JAX detects it".
  """
  env = os.environ if environ is None else environ
  devices = _device_ids(local_device_ids) or _device_ids(env.get("GENESIS_LOCAL_DEVICE_IDS"))
  decision: dict[str, Any] = dict(multi_process=False, source="single", coordinator_address=None,
                                  num_processes=1, process_id=0, local_device_ids=devices,
                                  cluster_detection_method=None)
  switch = env.get("GENESIS_DISTRIBUTED", "").strip().lower()
  if switch not in ("", "off", "auto"):
    raise DistributedConfigError(
        f"GENESIS_DISTRIBUTED={switch!r}: expected 'off', 'auto' or unset.")

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    source = "explicit"
  else:
    coordinator_address = env.get("GENESIS_COORDINATOR") or None
    num_processes = _int_env(env, "GENESIS_NUM_PROCESSES")
    process_id = _int_env(env, "GENESIS_PROCESS_ID")
    source = "env"
    index = _int_env(env, "JOB_COMPLETION_INDEX")
    if process_id is None and index is not None and (coordinator_address or num_processes):
      # Our indexed Kubernetes Job: one pod per host, its completion index is its process id.
      # (Other indexed Jobs, e.g. a sweep of independent runs, stay single-process.)
      process_id, source = index, "kubernetes"

  if switch == "off":
    decision["source"] = "off"
    return decision

  if any(v is not None for v in (coordinator_address, num_processes, process_id)):
    missing = [name for name, v in (("coordinator address", coordinator_address),
                                    ("process count", num_processes), ("process id", process_id))
               if v is None]
    if missing:
      where = "arguments" if source == "explicit" else (
          "GENESIS_COORDINATOR / GENESIS_NUM_PROCESSES / GENESIS_PROCESS_ID "
          "(or JOB_COMPLETION_INDEX)")
      raise DistributedConfigError(
          f"Multi-process settings from {where} lack the {', '.join(missing)}.")
    if not 0 <= process_id < num_processes:
      raise DistributedConfigError(
          f"Process id {process_id} is outside [0, {num_processes}) ({source} settings).")
    if ":" not in coordinator_address:
      raise DistributedConfigError(
          f"Coordinator address {coordinator_address!r} needs a port, e.g. 'host:1234'.")
    # "deactivate": everything is given, so JAX must not let a cluster it detects on its own
    # (say SLURM variables inside an salloc shell) override the device choice.
    decision.update(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id, source=source, multi_process=num_processes > 1,
                    cluster_detection_method="deactivate")
    return decision

  if switch == "auto":
    decision.update(multi_process=True, source="jax_auto", num_processes=None, process_id=None)
    return decision
  # Clusters JAX bootstraps by itself; counts, ids and the coordinator come from their env.
  if ((_int_env(env, "SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in env
      and "SLURM_STEP_NODELIST" in env):
    decision.update(multi_process=True, source="slurm", cluster_detection_method="slurm",
                    num_processes=None, process_id=None)
    gpus = _int_env(env, "SLURM_GPUS_ON_NODE") or 0
    if devices is None and env.get("SLURM_NTASKS_PER_NODE") == "1" and gpus > 1:
      # JAX gives each SLURM task the one GPU numbered SLURM_LOCALID; with one task per node
      # that would leave all but one GPU idle.
      decision["local_device_ids"] = list(range(gpus))
  elif (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    decision.update(multi_process=True, source="ompi", cluster_detection_method="ompi",
                    num_processes=None, process_id=None)
  elif "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
    decision.update(multi_process=True, source="tpu", cluster_detection_method="gketpu",
                    num_processes=None, process_id=None)
  elif not env.get("TPU_SKIP_MDS_QUERY") and tpu_chips() > 0:
    # A Cloud TPU VM: JAX reads the worker list from the metadata server (one host is fine too).
    decision.update(multi_process=True, source="tpu", num_processes=None, process_id=None)
  return decision


def _use_cpu_collectives() -> str | None:
  """Cross-process computations on CPU need a collectives backend; gloo ships with jaxlib.

  jax >= 0.5 defaults to gloo; older releases default to none and fail at the first cross-process
  all-reduce. A user's explicit choice (e.g. "mpi") is kept. Only the CPU client reads the flag,
  so setting it on GPU/TPU hosts changes nothing there.
  """
  import jax
  current = getattr(jax.config, "jax_cpu_collectives_implementation", None)
  if current is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    current = "gloo"
  return current


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout_s: int = 300) -> dict[str, Any]:
  """Starts the JAX distributed runtime when this run spans processes; call before any JAX use.

  Single-process runs call nothing. Returns `plan`'s decision plus `cpu_collectives`, for the run
  log. Raises DistributedConfigError on incomplete settings, and RuntimeError (from JAX) when a
  backend already exists or the coordinator cannot be reached within the timeout.

  In a multi-process run an uncaught exception ends its process at once (`fail_fast_excepthook`)
  instead of waiting up to 5 minutes in JAX's shutdown barrier for processes that will never
  reach it; the launchers (local.sh, srun --kill-on-bad-exit, a failed Job) then stop the rest.
  """
  decision = plan(coordinator_address, num_processes, process_id, local_device_ids)
  decision["cpu_collectives"] = None
  if not decision["multi_process"]:
    return decision
  import jax
  if jax.distributed.is_initialized():
    decision["source"] += " (already initialized)"
    return decision
  decision["cpu_collectives"] = _use_cpu_collectives()
  jax.distributed.initialize(
      coordinator_address=decision["coordinator_address"],
      num_processes=decision["num_processes"],
      process_id=decision["process_id"],
      local_device_ids=decision["local_device_ids"],
      cluster_detection_method=decision["cluster_detection_method"],
      initialization_timeout=initialization_timeout_s)
  sys.excepthook = fail_fast_excepthook
  return decision


def _multi_process_running() -> bool:
  # Only the distributed state is read: asking for process_count could create a backend.
  if "jax" not in sys.modules:
    return False
  import jax
  return jax.distributed.is_initialized()


def exit_now(code: int) -> NoReturn:
  """Ends this process without JAX's shutdown barrier (multi-process) or normally (otherwise).

  After an error, the other processes never reach that barrier, and JAX would hold this one for
  its shutdown timeout (300 s) before aborting; a launcher sees the failure only then.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  if _multi_process_running():
    os._exit(code)
  sys.exit(code)


def exit_with_error(message: str, code: int = 1) -> NoReturn:
  """`sys.exit(message)` that does not hang a multi-process run: prints, then `exit_now(code)`."""
  print(message, file=sys.stderr)
  exit_now(code)


def fail_fast_excepthook(exc_type, exc, tb) -> None:
  """sys.excepthook for multi-process runs: print the traceback, then `exit_now(1)`."""
  sys.__excepthook__(exc_type, exc, tb)
  exit_now(1)


def is_primary() -> bool:
  """Process 0 writes logs, summaries and PNGs; every process takes part in checkpointing."""
  import jax
  return jax.process_index() == 0


def describe_runtime() -> str:
  """One line for the run log: processes, devices and platform (after `initialize`)."""
  import jax
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"process {jax.process_index()} of {jax.process_count()} | "
          f"devices: {jax.local_device_count()} local, {jax.device_count()} global | "
          f"platform {jax.default_backend()} ({', '.join(kinds)})")
