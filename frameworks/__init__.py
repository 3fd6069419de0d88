"""The seed MLP in each framework: builders, the seed's data and training recipe.

Framework modules (`keras_mlp`, `torch_mlp`) import their framework; the rest does not.
"""
