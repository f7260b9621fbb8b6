"""cifarpress: compress CIFAR-10/100 classifiers for edge deployment."""

__version__ = "0.1.0"
