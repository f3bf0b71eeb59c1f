"""Data: reading scans, preparing pre-training cubes, input pipelines and target-task data.

  volume      the in-memory types: `Volume` (a scan, (x, y, z), RAS+) and `Candidate`.
  readers     NIfTI, MetaImage, NRRD and DICOM -> `Volume`.
  images2d    2D images (PNG, JPEG, TIFF, DICOM radiographs, single-slice NIfTI) -> `Image2D`.
  radiograph  2D normalisation to [0, 1] and letterbox/crop fits with a reversible transform.
  preprocess  resampling, body crop and intensity normalisation from `config.data`.
  sampling    where pre-training cubes are drawn (cube settings, scales, the lung filter).
  store       the one atomic file writer; memory-mapped cube arrays.
  manifest    a prepared dataset's layout, manifest, completeness checks and train/val split.
  prepare     `ensure_dataset`: `config.data` -> a complete prepared dataset.
  prepare2d   folders of 2D images -> a prepared dataset (`data.source="images2d"`).
  pipeline    grain loaders for pre-training cubes and target-task arrays.
  phantoms/   the built-in procedural chest-CT data set.
  tasks/      target-task data (MSD/nnU-Net folders, LUNA16 candidates) for fine-tuning.
"""
