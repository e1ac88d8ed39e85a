"""Losses of stage 1: pure tensors in, scalar out (imports nothing from the rest of ``dscl``).

- :class:`DSCLLoss`: decoupled supervised contrastive loss (DSCL).
- :class:`SupConLoss`: supervised contrastive baseline (SCL) over the same contrast set.
- :class:`PBSDLoss`: patch-based self distillation (PBSD).
"""

from .dscl import DSCLLoss, SupConLoss
from .pbsd import PBSDLoss

__all__ = ["DSCLLoss", "PBSDLoss", "SupConLoss"]
