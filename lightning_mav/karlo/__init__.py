"""Karlo (kakaobrain/karlo-v1-alpha, unCLIP) weights in diffusers' layout, converted to this package's networks."""
