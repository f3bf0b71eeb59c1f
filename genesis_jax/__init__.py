"""genesis_jax: Models Genesis (self-supervised U-Net pre-training for CT/MRI) in JAX/Flax.

Public API, for your own Flax code (arrays are channels-last: (N, x, y, z, C) or (N, x, y, C)):

  build_model, UNet, Encoder, Classifier   the Genesis U-Net, its encoder and classifier head
  CorruptionParams, corrupt, corrupt_batch the four Genesis corruptions (+ flip), pure JAX
  load_pretrained(path)                    released .pt/.h5, converted dir, or a pre-training
                                           workdir -> ({"params", "batch_stats"}, model config)
  merge_params(fresh, loaded, source=...)  copy matching weights into a new model, with a report
  load_volume(path)                        a NIfTI/MHD/NRRD/DICOM scan as a canonical (RAS+) Volume
  sliding_window_predict, segment_volume   whole-volume inference with overlapping windows
                                           (segment_volume: a 2D model slice by slice)
  defaults                                 the config schema (pretrain/finetune/experiment)

Imports are lazy: `import genesis_jax` does not start JAX (multi-host runs must call
jax.distributed.initialize first).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "genesis_jax.models.heads",
    "Classifier": "genesis_jax.models.heads",
    "UNet": "genesis_jax.models.unet",
    "Encoder": "genesis_jax.models.unet",
    "CorruptionParams": "genesis_jax.corruptions",
    "corrupt": "genesis_jax.corruptions",
    "corrupt_batch": "genesis_jax.corruptions",
    "load_pretrained": "genesis_jax.weights.transfer",
    "merge_params": "genesis_jax.weights.transfer",
    "defaults": "genesis_jax.config.schema",
    "load_volume": "genesis_jax.data.readers",
    "sliding_window_predict": "genesis_jax.eval.inference",
    "segment_volume": "genesis_jax.eval.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'genesis_jax' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  return module if name == "defaults" else getattr(module, name)


def __dir__():
  return __all__
