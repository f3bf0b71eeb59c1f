"""The CLI's edges, in-process: --help, one-line messages for bad keys and config files, quiet logs,
and which exceptions print one line and which a traceback."""
from __future__ import annotations

import logging
import pathlib

import pytest
from absl import flags

from genesis_jax import errors, main
from genesis_jax.train import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_help_lists_every_config_with_its_purpose_and_points_to_the_reference(capsys):
  with pytest.raises(SystemExit) as e:
    main.parse_flags(["genesis_jax.main", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for path in sorted((REPO / "configs").glob("*.py")):
    assert path.name in out and main.config_purpose(path) in out
  assert main.config_purpose(REPO / "configs" / "demo.py").startswith("Demo pre-training")
  assert "train.batch_size" in out and "docs/config.md" in out and "--verbosity" in out


def test_unknown_nested_key_is_one_clean_line_with_the_suggestion():
  from genesis_jax.config import schema
  config = schema.pretrain_config()
  config.lock()
  with pytest.raises((KeyError, AttributeError)) as e:
    config.train.batchsize = 2
  argv = ["genesis_jax.main", "--config", "configs/demo.py", "--config.train.batchsize=2"]
  msg = main.unknown_key_message(e.value, argv)
  assert msg == ("unknown config key 'batchsize' in --config.train.batchsize. Did you mean "
                 "\"batch_size\" instead of \"batchsize\"? docs/config.md lists every key.")
  with pytest.raises((KeyError, AttributeError)) as e:
    config.trian  # noqa: B018
  msg = main.unknown_key_message(e.value, ["x", "--config.trian.batch_size=2"])
  assert "\n" not in msg and "'trian' in --config.trian.batch_size" in msg
  assert 'Did you mean "train"' in msg


def test_missing_config_file_and_bad_variant_are_one_line(tmp_path):
  with pytest.raises(SystemExit) as e:
    main.parse_flags(["genesis_jax.main", "--config", "configs/nope.py", "--workdir", "x"])
  assert "configs/nope.py" in str(e.value.code) and "demo.py" in str(e.value.code)
  assert "\n" not in str(e.value.code)
  error = flags.IllegalFlagValueError(
      "flag --config=configs/demo.py:nope: Error whilst parsing config file:\n\n"
      "Traceback (most recent call last):\n"
      "  File \"configs/demo.py\", line 31, in get_config\n"
      "    raise ValueError(...)\n"
      "ValueError: Unknown variant 'nope' for demo.py.")
  assert main.flag_error_message(error) == (
      "flag --config=configs/demo.py:nope: Unknown variant 'nope' for demo.py.")


def test_library_info_logs_are_off_unless_verbosity_is_given(monkeypatch):
  monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 0)
  before = {n: logging.getLogger(n).level for n in main.LIBRARY_LOGGERS}
  try:
    main.quiet_library_logs()
    assert all(logging.getLogger(n).getEffectiveLevel() >= logging.WARNING
               for n in main.LIBRARY_LOGGERS)
  finally:
    for n, level in before.items():
      logging.getLogger(n).setLevel(level)


class _Distributed:
  """Stands in for train.distributed: records what the CLI would print and exit with."""

  def __init__(self):
    self.exited = None

  def initialize(self):
    return {"source": "single"}

  def is_primary(self):
    return True

  def describe_runtime(self):
    return "test"

  def exit_with_error(self, message, code=1):
    self.exited = message
    raise SystemExit(code)


@pytest.mark.parametrize("raised, one_line", [
    (errors.ConfigError("config.x=1 is not allowed; set it to 2."), True),
    (errors.MissingPathError("/no/such: does not exist."), True),
    (ValueError("a bug, not a user error"), False),
    (KeyError("bug"), False),
])
def test_user_errors_print_one_line_and_bugs_their_traceback(monkeypatch, raised, one_line):
  from genesis_jax import run as run_lib
  from genesis_jax.train import distributed
  fake = _Distributed()
  for name in ("initialize", "is_primary", "describe_runtime", "exit_with_error"):
    monkeypatch.setattr(distributed, name, getattr(fake, name))
  monkeypatch.setattr(main, "_enable_compilation_cache", lambda: None)
  monkeypatch.setattr(main, "quiet_library_logs", lambda: None)

  def fail(config, workdir):
    raise raised
  monkeypatch.setattr(run_lib, "run", fail)
  monkeypatch.setattr(main, "_CONFIG", type("C", (), {"value": None})())
  monkeypatch.setattr(main, "_WORKDIR", type("W", (), {"value": "/tmp/x"})())
  monkeypatch.delenv("GENESIS_TRACEBACK", raising=False)
  if one_line:
    with pytest.raises(SystemExit):
      main.main(["genesis_jax.main"])
    assert fake.exited == f"error: {raised}"
    monkeypatch.setenv("GENESIS_TRACEBACK", "1")
    with pytest.raises(type(raised)):
      main.main(["genesis_jax.main"])
  else:
    with pytest.raises(type(raised)):  # Propagates: Python prints the traceback.
      main.main(["genesis_jax.main"])
    assert fake.exited is None


def test_progress_line_is_concise():
  progress = metric_writers.Progress(200, 0, 8)
  line = progress.line(20, {"loss": 0.0123456, "learning_rate": 1.0, "grad_norm": 3.0,
                            "nonfinite": 0.0}, rate=2.0)
  assert line == "step  20/200 | loss 0.012346 | lr 1 | 2 steps/s, 16 cubes/s | ETA 1m30s"


@pytest.mark.parametrize("name, key", [("GENESIS_WINOGRAD_MIN_MACS", "model.winograd_min_macs"),
                                       ("GENESIS_WINOGRAD_TILE", "model.conv_impl")])
def test_retired_numerics_environment_variables_name_their_config_key(name, key):
  main.check_retired_environment({})  # nothing set: fine
  with pytest.raises(errors.ConfigError, match=f"{name} is no longer read.*{key}"):
    main.check_retired_environment({name: "0"})


@pytest.mark.parametrize("key, value, match", [
    ("train.learning_rate", -0.001, r"^config.train.learning_rate=-0.001 must be > 0\.$"),
    ("num_steps", 0, r"^config.num_steps=0 must be >= 1\.$"),
    ("keep_checkpoints", 0, r"^config.keep_checkpoints=0 must be >= 1\.$"),
    ("eval_every", 0, r"^config.eval_every=0 must be >= 1\.$"),
    ("checkpoint_every", 0, r"^config.checkpoint_every=0 must be >= 1\.$"),
    ("log_every", 0, r"^config.log_every=0 must be >= 1\.$"),
    ("model.width", 0, r"^config.model.width=0 must be >= 1\.$"),
    ("data.crop", (60, 60, 30), r"every size must be divisible by 8 \(2\*\*config.model.depth"),
])
def test_bad_values_are_refused_before_anything_is_prepared_or_written(tmp_path, monkeypatch,
                                                                       key, value, match):
  from genesis_jax import run as run_lib
  from genesis_jax.config import loading, schema
  monkeypatch.chdir(REPO)
  config = loading.load_config_file("configs/demo.py")
  scans = tmp_path / "scans"
  scans.mkdir()
  (scans / "scan.nii.gz").write_bytes(b"")  # A folder to prepare, were the config accepted.
  loading.apply_overrides(config, {"data": {"source": "folder", "path": str(scans)}})
  loading.apply_overrides(config, schema.nest({key: value}))
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError, match=match) as e:
    run_lib.run(config, workdir)
  assert "\n" not in str(e.value)
  assert not workdir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scans"]



def test_flag_error_message_drops_the_error_class_name():
  error = ValueError("genesis_jax.errors.ConfigError: Unknown variant 'nope' for demo.py.")
  assert main.flag_error_message(error) == "Unknown variant 'nope' for demo.py."
  assert main.strip_class("DataError: bad scan") == "bad scan"
