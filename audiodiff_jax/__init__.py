"""audiodiff-jax: latent audio diffusion transformers trained on device meshes."""
