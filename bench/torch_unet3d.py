"""Reference PyTorch UNet3D written from docs/method.md#pytorch-unet3d and #pytorch-checkpoint.

For benchmarks and fixture generation only; torch is not a dependency of genesis_jax. Module and
parameter names reproduce the released checkpoint's state_dict keys (down_tr64.ops.0.conv1.weight,
up_tr256.up_conv.weight, out_tr.final_conv.weight, ...). Layout (N, C, x, y, z).

`width` scales every channel count (32 = the released network); block names keep the original's
width-32 channel numbers. `always_batch_stats=True` reproduces the original's batch norm, which
normalises with batch statistics in eval mode too.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class BatchNorm3d(nn.BatchNorm3d):
  def __init__(self, c: int, always_batch_stats: bool = False):
    super().__init__(c, momentum=0.1, eps=1e-5)
    self.always_batch_stats = always_batch_stats

  def forward(self, x):
    if not self.always_batch_stats:
      return super().forward(x)
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                        self.momentum, self.eps)


class ConvUnit(nn.Module):
  def __init__(self, cin: int, cout: int, always_batch_stats: bool):
    super().__init__()
    self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
    self.bn1 = BatchNorm3d(cout, always_batch_stats)

  def forward(self, x):
    return F.relu(self.bn1(self.conv1(x)))


class Block(nn.Module):
  def __init__(self, cin: int, c0: int, c1: int, always_batch_stats: bool):
    super().__init__()
    self.ops = nn.Sequential(ConvUnit(cin, c0, always_batch_stats),
                             ConvUnit(c0, c1, always_batch_stats))

  def forward(self, x):
    return self.ops(x)


class UpBlock(nn.Module):
  def __init__(self, cin: int, cskip: int, cout: int, always_batch_stats: bool):
    super().__init__()
    self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
    self.ops = nn.Sequential(ConvUnit(cin + cskip, cout, always_batch_stats),
                             ConvUnit(cout, cout, always_batch_stats))

  def forward(self, x, skip):
    return self.ops(torch.cat((self.up_conv(x), skip), 1))


class Output(nn.Module):
  def __init__(self, cin: int, n_out: int):
    super().__init__()
    self.final_conv = nn.Conv3d(cin, n_out, kernel_size=1)

  def forward(self, x):
    return self.final_conv(x)  # Logits; the original applies sigmoid here.


class UNet3D(nn.Module):
  """Depth 3. forward returns logits (N, n_out, x, y, z)."""

  def __init__(self, width: int = 32, in_channels: int = 1, n_out: int = 1,
               always_batch_stats: bool = False):
    super().__init__()
    w, abs_ = width, always_batch_stats
    self.down_tr64 = Block(in_channels, w, 2 * w, abs_)
    self.down_tr128 = Block(2 * w, 2 * w, 4 * w, abs_)
    self.down_tr256 = Block(4 * w, 4 * w, 8 * w, abs_)
    self.down_tr512 = Block(8 * w, 8 * w, 16 * w, abs_)
    self.up_tr256 = UpBlock(16 * w, 8 * w, 8 * w, abs_)
    self.up_tr128 = UpBlock(8 * w, 4 * w, 4 * w, abs_)
    self.up_tr64 = UpBlock(4 * w, 2 * w, 2 * w, abs_)
    self.out_tr = Output(2 * w, n_out)

  def forward(self, x):
    s64 = self.down_tr64(x)
    s128 = self.down_tr128(F.max_pool3d(s64, 2))
    s256 = self.down_tr256(F.max_pool3d(s128, 2))
    bottom = self.down_tr512(F.max_pool3d(s256, 2))
    x = self.up_tr256(bottom, s256)
    x = self.up_tr128(x, s128)
    x = self.up_tr64(x, s64)
    return self.out_tr(x)
