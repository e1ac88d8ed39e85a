"""Losses of stage 1: pure tensors in, scalar out (imports nothing from the rest of ``dscl``).

- :class:`DSCLLoss`: decoupled supervised contrastive loss (DSCL).
- :class:`SupConLoss`: supervised contrastive baseline (SCL) over the same contrast set.
- :class:`PBSDLoss`: patch-based self distillation (PBSD).
- :class:`BalancedContrastiveLoss`, :class:`LogitAdjustedCrossEntropy`, :class:`BCLLoss`: the
  peer method BCL (balanced contrastive loss, logit-adjusted CE, their weighted sum).
- :class:`PaCoLoss`: the peer method PaCo (parametric contrastive loss).
"""

from .bcl import BalancedContrastiveLoss, BCLLoss, BCLTerms, LogitAdjustedCrossEntropy
from .dscl import DSCLLoss, SupConLoss
from .paco import PaCoLoss
from .pbsd import PBSDLoss

__all__ = [
    "BCLLoss",
    "BCLTerms",
    "BalancedContrastiveLoss",
    "DSCLLoss",
    "LogitAdjustedCrossEntropy",
    "PBSDLoss",
    "PaCoLoss",
    "SupConLoss",
]
