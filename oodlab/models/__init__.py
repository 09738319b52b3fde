"""Generative models: encoders, decoders and the VAE that joins them."""

from oodlab.models.vae import VAE, VAEConfig, build_vae

__all__ = ["VAE", "VAEConfig", "build_vae"]
