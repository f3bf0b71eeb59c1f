"""Data: reading scans, preparing pre-training cubes, input pipelines and target-task data.

  volume      the in-memory types: `Volume` (a scan, (x, y, z), RAS+) and `Candidate`.
  readers     NIfTI, MetaImage, NRRD and DICOM -> `Volume`.
  preprocess  resampling, body crop and intensity normalisation from `config.data`.
  sampling    where pre-training cubes are drawn (cube settings, scales, the lung filter).
  store       the one atomic file writer; memory-mapped cube arrays.
  manifest    a prepared dataset's layout, manifest, completeness checks and train/val split.
  prepare     `ensure_dataset`: `config.data` -> a complete prepared dataset.
  pipeline    grain loaders for pre-training cubes and target-task arrays.
  phantoms/   the built-in procedural chest-CT data set.
  tasks/      target-task data (MSD/nnU-Net folders, LUNA16 candidates) for fine-tuning.
"""
