"""Networks and their taps: the Model (the original's MLP, a CNN, a ViT, a user's frozen module), its
training loop, the forward path through a tree of models, and the device a model runs on.

Imports: the base modules (errors, fileio) only.
"""
