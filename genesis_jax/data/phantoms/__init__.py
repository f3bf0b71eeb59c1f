"""Procedural chest-CT phantoms: the built-in data set that needs no download.

Each subject is a miniature chest CT drawn from one integer seed (`np.random.default_rng(seed)`):
body ellipse with subcutaneous fat and muscle, ribs, spine and sternum, mediastinum and heart,
trachea and main bronchi, two lungs with smooth parenchymal texture, branching and tapering vessel
trees, and nodules (solid, ground-glass, part-solid; isolated, juxta-vascular, juxta-pleural) of
3-25 mm. Look-alikes a nodule detector confuses with nodules are placed on purpose: vessel
bifurcations, vessel crossings, vessel segments (end-on when they run along z), scars and pleural
bumps. Blur and Gaussian noise finish the image.

Geometry is built in millimetres so that nodule and vessel sizes are physical whatever the voxel
spacing (0.7-1.0 mm in-plane, 1.0-2.5 mm between slices, drawn per subject); the body is scaled to
fill the field of view, so at 128 x 128 voxels the chest is a small one (about 100 mm wide).

Arrays are (x, y, z) in RAS+ voxel order (index i towards patient Right, j Anterior, k Superior),
matching `Volume`. Intensities are Hounsfield units.

Two target tasks mirror the paper's NCS and NCC: `Phantom.nodule_mask` (segmentation) and
`Phantom.candidates` (label 1 = true nodule centre, 0 = look-alike), written to disk by
`write_phantom_dataset` as an MSD/nnU-Net folder plus LUNA16-style candidates.csv:

  python -m genesis_jax.data.phantoms --out data/phantoms --subjects 24 --seed 0

Subject i of the data set drawn with seed s is `make_phantom(subject_seed(s, i), shape)`, so a
pipeline can also generate the same subjects in memory, on the fly, without the files.

Modules: `geometry` (grid, fields, soft shapes), `anatomy` (body, bones, lungs, airways, vessels),
`lesions` (nodules and look-alikes), `subject` (one subject: `make_phantom`), `dataset` (the
folder on disk: `write_phantom_dataset`), `cli` (the command line above), `drr` (digitally
reconstructed radiographs of a phantom, PA and lateral, with findings from its nodules),
`radiograph_findings` (mass, cardiomegaly, effusion and consolidation drawn into a copy of a
phantom's CT for its radiographs only) and `xray_dataset` (the built-in radiograph set on disk:
`write_xray_dataset`).
"""
from __future__ import annotations

from genesis_jax.data.phantoms.anatomy import TISSUE
from genesis_jax.data.phantoms.cli import main
from genesis_jax.data.phantoms.dataset import GENERATOR_VERSION, MANIFEST, write_phantom_dataset
from genesis_jax.data.phantoms.lesions import LOOKALIKE_KINDS, NODULE_KINDS
from genesis_jax.data.phantoms.subject import Phantom, make_phantom, subject_name, subject_seed
from genesis_jax.data.volume import Candidate

__all__ = ["Candidate", "GENERATOR_VERSION", "LOOKALIKE_KINDS", "MANIFEST", "NODULE_KINDS",
           "Phantom", "TISSUE", "main", "make_phantom", "subject_name", "subject_seed",
           "write_phantom_dataset"]
