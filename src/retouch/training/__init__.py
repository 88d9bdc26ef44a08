"""Trainers: the ToyWorld model's (:mod:`.toyworld`: UNet and text encoder with grounding,
the VAE stage, decoder tuning, export), over resumable safetensors checkpoints
(:mod:`.checkpoint`). Later trainers (personalization, control adapters, score distillation)
share the checkpoints and :mod:`retouch.losses`. The world they train on is :mod:`retouch.toyworld`.
"""
