"""The models: plain PyTorch modules with no parallel code (Llama-family blocks, mixture of experts).

parallel/ applies a layout to them from outside; checkpoint/ reads and writes their weights.
"""
