"""The network: the paper's layers (layers.py), the AlexNet variants as Flax
modules (alexnet.py), and the device mesh with the towers on it
(parallel.py), the one place where anything crosses between towers or
devices. Imports only runtime/."""
