"""Models: the Genesis U-Net and its target-task heads, in Flax.

  kernels  the array functions behind the layers (native and unfold/Winograd convs with their
           hand-written gradients, transposed-conv upsampling, pooling, bias add, batch norm).
  layers   the Flax modules Conv, UpConv and BatchNorm on those kernels.
  unet     the U-Net (Encoder, Decoder, UNet) and the settings every module passes down.
  heads    the classifier head and `build_model`, which makes a model from `config.model`.
"""
