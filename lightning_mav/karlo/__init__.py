"""Karlo (kakaobrain/karlo-v1-alpha, unCLIP): its diffusers networks as ours, and their parameterisation."""
