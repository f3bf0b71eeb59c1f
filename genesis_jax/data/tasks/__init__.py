"""Target-task data: the user's labelled data (or the phantom tasks) cut into fine-tuning cubes.

Modules:
  segmentation  MSD / nnU-Net image and label folders -> (image, mask) cubes.
  candidates    LUNA16-style candidate CSVs -> cubes centred on candidates, with their classes.
  cubes         crop sizes, stacking and centred extraction shared by both.
  dataset       `load(config, workdir)`: the train / val / test arrays of a fine-tuning run, split
                by case; the phantom tasks are written in the same layouts first.
  images2d_tasks  2D images (radiographs): multi-label classification from a ChestX-ray8-style
                CSV and 2D segmentation (MSD / nnU-Net 2D), letterboxed to the crop.

Cubes are channels-last: images (N, x, y, z, 1) float32 in [0, 1]; a 2-entry crop (x, y) gives
2D slices (N, x, y, 1) taken at the same centres.
"""
from __future__ import annotations

from genesis_jax.data.tasks.candidates import (LazyScans, classification_cubes,
                                               read_candidates_csv, world_to_voxel)
from genesis_jax.data.tasks.cubes import extract_cube
from genesis_jax.data.tasks.dataset import load, num_cases, split_ids
from genesis_jax.data.tasks.segmentation import (SegmentationCase, load_segmentation_case,
                                                 load_segmentation_pairs, read_num_classes,
                                                 segmentation_cases, segmentation_cubes)
from genesis_jax.data.volume import Candidate

__all__ = ["Candidate", "LazyScans", "SegmentationCase", "classification_cubes", "extract_cube",
           "load", "load_segmentation_case", "load_segmentation_pairs", "num_cases",
           "read_candidates_csv", "read_num_classes", "segmentation_cases", "segmentation_cubes",
           "split_ids", "world_to_voxel"]
