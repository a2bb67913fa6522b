"""sdtune: personalise Stable Diffusion with four methods behind one interface."""

__version__ = "0.1.0"
