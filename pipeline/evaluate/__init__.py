"""``bae evaluate``: what a reconstruction costs the model — the autoencoder spliced into the forward
pass at its layer, next-token CE loss, zero/mean ablation, CE recovered, KL and JSD (docs/evaluate.md)."""
