"""The papers' experiments on stage one: their small VQ-VAE (``vqvae``), the quantizer
comparison (``compare``), the MNIST tables (``reproduce``) and their data (``mnist``)."""
