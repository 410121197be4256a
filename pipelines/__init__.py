"""diffusers ``DiffusionPipeline`` subclasses for sampling from a trained model, and evaluation."""
