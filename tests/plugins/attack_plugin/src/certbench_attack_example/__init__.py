"""A third-party certbench attack adapter (test fixture): ``example:fgsm``."""
