"""The workflow layer: stages that read and write files, and the runs built from them.

- ``training``: train the surrogate from a counts file (``surrogate-cert train``);
- ``pipeline``: the whole pipeline in one folder, resumable (``surrogate-cert quickstart``);
- ``bench``: every certifier side by side (``surrogate-cert bench`` and ``benchmarks/``);
- ``throughput``: the counting engine against a raw forward pass and unseeded noise, and its scaling over
  processes (``benchmarks/datagen_throughput.py``);
- ``report``: HTML / Markdown / JSON rendering of ``calibration.summary`` numbers.

Only the command line imports this layer.
"""
