"""Merging models (TIES, DARE, task arithmetic) and PAFT's parallel training + merge."""
