"""Released and pre-trained weights, read and written without PyTorch or TensorFlow.

`torch_pickle` (torch.save files) and `keras_h5` (Keras .h5 files) are general readers; `release`
maps the released Models Genesis files onto our U-Net tree and back; `transfer` loads any
pre-trained weights into a new model; `convert` is the converter CLI
(`python -m genesis_jax.weights.convert`).
"""
