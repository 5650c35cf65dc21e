"""bae: cache LLM hidden states, train Binary Autoencoders on them, measure feature-set entropy."""

__version__ = "0.1.0"
