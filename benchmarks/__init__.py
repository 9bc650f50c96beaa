"""Side-by-side benchmarks of lightning-mav (``python -m benchmarks.run``; results in ``benchmarks/RESULTS.md``).

- :mod:`benchmarks.train_step`: our D_t training step vs make-a-video-pytorch's ``SpaceTimeUnet`` and diffusers'
  ``UNet3DConditionModel`` at matched configs.
- :mod:`benchmarks.frames_scaling`: D_t step time against the number of frames, factorised (P3D) vs full 3-D attention.
- :mod:`benchmarks.sample`: time for one 16-frame video per stage and for the whole pipeline at demo sizes.
- :mod:`benchmarks.data_throughput`: clip decoding throughput (run on its own).
"""
