"""unitune: SFT and preference optimization, jointly, in one run."""

__version__ = "0.1.0"
