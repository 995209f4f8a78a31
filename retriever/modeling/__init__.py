"""Modelling: the model registry, the Encoder, pooling, prompts and the device policy."""
