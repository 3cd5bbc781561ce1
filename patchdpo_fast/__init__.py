"""patchdpo_fast: fast, scalable PatchDPO training.

Subpackages (each importable without the ones listed after it):

* ``patchdpo_fast.kernels`` – Triton kernels and their launch helpers.
* ``patchdpo_fast.ops`` – loss definitions (PyTorch reference), autograd Functions, dispatch and the public
  functional / ``nn.Module`` losses.
"""

__version__ = "0.1.0"
