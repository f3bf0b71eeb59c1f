"""Bug-or-scale control of the deep-feature collapse (issue 17, deliverable 3).

  python bench/torch_control.py --workdir runs/torch_control --steps 200 --width 8

Two arms pre-train the same restoration U-Net from the same initial weights on the same corrupted
batches; only the network and optimizer implementation differ:

- JAX: our own pre-training (`--config`, configs/demo.py by default) run in <workdir>/jax, or
  reused when that folder already holds a finished run of the same config;
- PyTorch: the reference network of bench/torch_unet3d.py, given our step-0 init through
  `weights.release.to_pytorch_state_dict`, trained with the torch optimizer that matches the
  config (Adam or SGD with momentum, same learning rate and schedule, same gradient clip) on the
  batches our train step sees: the same grain loader and seed, corrupted by `corrupt_batch` with
  the step key `fold_in(state rng, step)` of train/pretrain.py. Batch norm: torch momentum 0.1 is
  flax momentum 0.9 (docs/method.md#batch-normalisation).

First, a sanity check: on one batch, the torch network with the exported init and our model give
the same logits (inference and training-mode batch norm); the script stops if they do not. The
torch state_dict is saved (torch.save) at the JAX run's checkpoint steps, read back with our own
loader (`weights.release.import_pytorch`) and probed like the JAX checkpoints and the shared init
with experiments/probe.py's public functions (same labelled cubes, same folds): per encoder level,
the effective rank of the pooled features and the linear-probe score. Prints both restoration
losses per logged step and a side-by-side table; writes <workdir>/torch_control.json. The same
collapse in both arms points to the recipe and data, a different one to a bug in our code.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import jax  # noqa: E402
import torch  # noqa: E402

import torch_unet3d  # noqa: E402
from genesis_jax import corruptions  # noqa: E402
from genesis_jax.config import loading  # noqa: E402
from genesis_jax.config.validate import validate  # noqa: E402
from genesis_jax.data import pipeline, prepare  # noqa: E402
from genesis_jax.experiments import probe  # noqa: E402
from genesis_jax.train import optim  # noqa: E402
from genesis_jax.weights import release  # noqa: E402


def parse_sets(items: list[str]) -> dict:
  """key=value pairs (values as Python literals where they parse) -> {dotted key: value}."""
  out = {}
  for item in items:
    key, _, text = item.partition("=")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def pretrain_config(args):
  config = loading.load_config_file(args.config)
  overrides = {"num_steps": args.steps, "model.width": args.width,
               "checkpoint_every": args.checkpoint_every,
               "keep_checkpoints": args.steps // args.checkpoint_every + 1,
               **parse_sets(args.set)}
  loading.apply_overrides(config, overrides)
  validate(config)
  if config.model.variant != "pytorch" or config.model.depth != 3 or config.model.spatial_dims != 3:
    raise SystemExit("the torch reference is the depth-3 3D pytorch-variant U-Net: set "
                     "model.variant=pytorch, model.depth=3, model.spatial_dims=3.")
  if config.train.schedule == "plateau":
    raise SystemExit("train.schedule=plateau is driven by our host loop; use step/cosine/constant.")
  return config


def jax_arm(config, jax_dir: pathlib.Path) -> float:
  """Runs our pre-training in `jax_dir` unless a finished run of the same config is there;
  returns its wall time (0.0 when reused)."""
  done = jax_dir / "summary.json"
  if done.is_file():
    saved = json.loads((jax_dir / "config.json").read_text())
    mine = json.loads(config.to_json_best_effort())
    if {k: saved.get(k) for k in ("model", "data", "train", "corruption", "seed", "num_steps")} \
        != {k: mine.get(k) for k in ("model", "data", "train", "corruption", "seed", "num_steps")}:
      raise SystemExit(f"{jax_dir} holds a pre-training of another config; use another workdir.")
    print(f"jax arm: reusing the finished run in {jax_dir}", flush=True)
    return 0.0
  from genesis_jax.train import pretrain
  t0 = time.perf_counter()
  pretrain.train(config, jax_dir)
  return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the torch arm
def to_torch(x) -> torch.Tensor:
  """(N, x, y, z, C) array -> torch (N, C, x, y, z) float32."""
  return torch.from_numpy(np.array(np.moveaxis(np.asarray(x, np.float32), -1, 1)))


def torch_net(variables: dict, width: int) -> torch_unet3d.UNet3D:
  """The reference network holding our variables (exported through weights.release)."""
  net = torch_unet3d.UNet3D(width=width)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in release.to_pytorch_state_dict(variables).items()}
  net.load_state_dict(sd, strict=True)
  return net


def save_torch(net: torch.nn.Module, path: pathlib.Path) -> None:
  """The original's checkpoint layout, written by torch itself: {'state_dict': {'module.*'}}."""
  sd = {"module." + k: v.detach().clone() for k, v in net.state_dict().items()}
  tmp = path.with_suffix(".tmp")
  torch.save({"state_dict": sd}, tmp)
  tmp.replace(path)


def sanity_check(model, init: dict, net: torch.nn.Module, x: np.ndarray, tol: float,
                 tol_train: float) -> dict:
  """Max |logit difference| between our model and the torch net, inference and training mode.

  In training mode a float64 copy of the torch net is the referee: our batch norm computes the
  variance in one pass (E[x^2] - E[x]^2, models/kernels.py), torch in two, so float32 rounding
  differs more there; "train_jax_vs_f64" and "train_torch_vs_f64" say whose it is.
  """
  diffs = {}
  ours_eval = np.asarray(model.apply(init, x, train=False))
  ours_train = np.asarray(model.apply(init, x, train=True, mutable=["batch_stats"])[0])
  ref = copy.deepcopy(net).double()
  with torch.no_grad():
    net.eval()
    diffs["eval"] = float(np.abs(nhwc(net(to_torch(x))) - ours_eval).max())
    net.train(True)
    theirs = nhwc(net(to_torch(x)))
    f64 = nhwc(ref.train(True)(to_torch(x).double()))
  diffs["train"] = float(np.abs(theirs - ours_train).max())
  diffs["train_jax_vs_f64"] = float(np.abs(ours_train - f64).max())
  diffs["train_torch_vs_f64"] = float(np.abs(theirs - f64).max())
  print(f"sanity check at step 0: max |logits JAX - torch| = {diffs['eval']:.2e} (inference), "
        f"{diffs['train']:.2e} (batch statistics; vs a float64 torch: JAX "
        f"{diffs['train_jax_vs_f64']:.2e}, torch {diffs['train_torch_vs_f64']:.2e}); "
        f"max |logit| {np.abs(ours_train).max():.2f}", flush=True)
  if diffs["eval"] > tol or diffs["train"] > tol_train:
    raise SystemExit(f"the torch net and our model disagree by more than {tol} (inference) or "
                     f"{tol_train} (training mode): the comparison would mean nothing.")
  return diffs


def nhwc(t: torch.Tensor) -> np.ndarray:
  """torch (N, C, x, y, z) -> numpy (N, x, y, z, C)."""
  return np.moveaxis(t.detach().numpy(), 1, -1)


def torch_optimizer(net, config, global_batch: int):
  """The torch optimizer and per-step scheduler of `config.train` (as train/optim.py builds)."""
  cfg = config.train
  lr = optim.base_learning_rate(cfg, global_batch)
  if cfg.optimizer == "adam":
    opt = torch.optim.Adam(net.parameters(), lr=lr)  # optax.adam's defaults are torch's.
  else:
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=float(cfg.momentum))
  schedule = optim.make_schedule(cfg, lr, int(config.num_steps))
  factor = (lambda s: float(schedule(s)) / lr) if callable(schedule) else (lambda s: 1.0)
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def torch_arm(config, model, init, jax_dir: pathlib.Path, torch_dir: pathlib.Path,
              save_steps: set[int], tol: tuple[float, float]) -> dict:
  """Trains the torch net on our corrupted batches; saves it at `save_steps`."""
  torch_dir.mkdir(parents=True, exist_ok=True)
  dataset_dir = prepare.ensure_dataset(config.data, jax_dir, seed=config.seed)
  batch = int(config.train.batch_size) * jax.device_count()
  loader = pipeline.pretrain_loader(pipeline.CubeSource(dataset_dir, "train"), batch_size=batch,
                                    seed=config.seed, worker_count=config.data.num_workers)
  it = iter(loader)
  net = torch_net(init, int(config.model.width))
  corruption = corruptions.CorruptionParams.from_config(config.corruption)
  corrupt = jax.jit(lambda k, x: corruptions.corrupt_batch(k, x, corruption))
  rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # step.create_state's state rng.
  opt, sched = torch_optimizer(net, config, batch)
  clip = float(config.train.grad_clip)
  losses, diffs, t0 = [], None, time.perf_counter()
  for step in range(int(config.num_steps)):
    images = next(it)["image"]
    inputs, targets = corrupt(jax.random.fold_in(rng, step), images)
    if diffs is None:
      diffs = sanity_check(model, init, net, np.asarray(inputs), *tol)
    pred = torch.sigmoid(net(to_torch(inputs)))
    loss = torch.mean(torch.square(pred - to_torch(targets)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    if step + 1 in save_steps:
      save_torch(net, torch_dir / f"step_{step + 1}.pt")
  return {"losses": losses, "sanity": diffs, "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ comparison
def logged_losses(jax_dir: pathlib.Path, torch_losses: list[float]) -> list[tuple]:
  """(step, JAX mean train loss, torch mean loss over the same steps) per logged JAX step."""
  rows, last = [], 0
  for line in (jax_dir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if "loss" in m and "step" in m:
      s = int(m["step"])
      rows.append((s, float(m["loss"]), float(np.mean(torch_losses[last:s]))))
      last = s
  return rows


def probe_arms(probe_cfg, probe_dir: pathlib.Path, model, arms: list[tuple]) -> list[dict]:
  """Rank and probe score per level of each (arm, step, variables), on the same cubes/folds."""
  x, y, groups = probe.labelled_cubes(probe_cfg, probe_dir)
  p = probe_cfg.probe
  splits = probe.probe_folds(y, groups, int(p.folds), int(probe_cfg.seed))
  pooled = probe.pooled_encoder(model)
  print(f"probe: {len(x)} cubes of {len(np.unique(groups))} cases", flush=True)
  rows = []
  for arm, step, variables in arms:
    for level, f in enumerate(probe.encoder_features(pooled, variables, x, int(p.batch_size))):
      score = probe.probe_score(f, y, splits, float(p.C))
      rows.append({"arm": arm, "step": step, "level": level, "channels": int(f.shape[1]),
                   "effective_rank": probe.effective_rank(f), "probe_metric": score["metric"],
                   "probe_mean": score["mean"], "probe_std": score["std"]})
  return rows


def table(rows: list[dict]) -> str:
  get = {(r["arm"], r["step"], r["level"]): r for r in rows}
  steps = [probe.INIT] + sorted({r["step"] for r in rows if r["step"] != probe.INIT})
  levels = sorted({r["level"] for r in rows})
  metric = rows[0]["probe_metric"]
  lines = [f"| step | level | rank JAX | rank torch | {metric} JAX | {metric} torch |",
           "|---|---|---|---|---|---|"]
  for s in steps:
    for lv in levels:
      j = get[("jax", s, lv)] if s != probe.INIT else get[("init", s, lv)]
      t = get[("torch", s, lv)] if s != probe.INIT else j
      lines.append(f"| {s} | {lv} | {j['effective_rank']:.2f} | {t['effective_rank']:.2f} | "
                   f"{j['probe_mean']:.3f} | {t['probe_mean']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--width", type=int, default=8)
  ap.add_argument("--checkpoint_every", type=int, default=50)
  ap.add_argument("--set", nargs="*", default=[], help="pre-training overrides key=value")
  ap.add_argument("--probe_config", default=str(REPO / "configs" / "probe_phantom.py"))
  ap.add_argument("--probe_set", nargs="*", default=[], help="probe config overrides key=value")
  ap.add_argument("--tol", type=float, default=1e-4,
                  help="sanity check: max |logit diff| in inference mode")
  ap.add_argument("--tol_train", type=float, default=1e-3,
                  help="sanity check: max |logit diff| with batch statistics")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
  args = ap.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  workdir = pathlib.Path(args.workdir).absolute()
  jax_dir, torch_dir = workdir / "jax", workdir / "torch"
  config = pretrain_config(args)
  probe_cfg = loading.load_config_file(args.probe_config)
  loading.apply_overrides(probe_cfg, {"probe.pretrain_dir": str(jax_dir),
                                      **parse_sets(args.probe_set)})
  validate(probe_cfg)

  jax_wall = jax_arm(config, jax_dir)
  saved = probe.checkpoints_to_probe(jax_dir, "all")
  model, init = probe.pretraining_init(probe.pretraining_config(jax_dir), 1)
  out = torch_arm(config, model, init, jax_dir, torch_dir, {s for s, _ in saved},
                 (args.tol, args.tol_train))

  arms = [("init", probe.INIT, init)]
  for step, sub in saved:
    arms.append(("jax", step, probe.load_checkpoint(jax_dir, step, sub)))
    arms.append(("torch", step, release.import_pytorch(torch_dir / f"step_{step}.pt")))
  rows = probe_arms(probe_cfg, workdir / "probe", model, arms)

  losses = logged_losses(jax_dir, out["losses"])
  print("\n| step | loss JAX | loss torch |\n|---|---|---|")
  for s, lj, lt in losses:
    print(f"| {s} | {lj:.5f} | {lt:.5f} |")
  text = table(rows)
  print("\n" + text, flush=True)
  result = {"sanity_max_abs_logit_diff": out["sanity"], "losses": losses, "rows": rows,
            "jax_wall_s": jax_wall, "torch_wall_s": out["wall_s"], "argv": sys.argv[1:] if
            argv is None else list(argv)}
  (workdir / "torch_control.json").write_text(json.dumps(result, indent=1))
  print(f"jax arm {jax_wall:.0f} s, torch arm {out['wall_s']:.0f} s; "
        f"{workdir / 'torch_control.json'}", flush=True)
  return result


if __name__ == "__main__":
  main()
