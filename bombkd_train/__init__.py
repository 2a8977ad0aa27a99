"""bombkd training: backbones, featurize, converters, the fusion head and the one trainer."""
