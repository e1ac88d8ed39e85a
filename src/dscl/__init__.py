"""dscl: Decoupled Supervised Contrastive Learning (DSCL) and Patch-Based Self Distillation (PBSD).

Xuan & Zhang, "Decoupled Contrastive Learning for Long-Tailed Recognition", AAAI 2024
(arXiv 2403.06151).
"""

__version__ = "0.1.0"
