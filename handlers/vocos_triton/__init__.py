"""Server side of Vocos on Triton: checkpoint loading, batched TorchScript modules, export and serving.

Importing this package is cheap and torch-free (the client SDK imports :mod:`vocos_triton.contract`);
the torch-based modules are imported only where they are used.
"""

__version__ = "0.1.0"
