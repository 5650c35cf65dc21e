"""Moving bae checkpoints and activations to and from the tools researchers already use."""
