"""Mesa: training that keeps 8-bit copies of the activations saved for the backward pass (see plugin.py)."""
