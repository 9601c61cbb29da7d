"""unmask: remove face masks from photos with a GAN (Din et al., IEEE Access 2020)."""

__version__ = "0.1.0"
