"""Models: backbones through their plugins, weights, the recipe table, checkpoints, metrics."""
