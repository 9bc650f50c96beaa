"""Karlo (kakaobrain/karlo-v1-alpha, unCLIP) in diffusers' layout -> the suite's networks: unet.py, prior.py, importer.py."""
