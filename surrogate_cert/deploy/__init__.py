"""The deployment layer: what loads a surrogate, its calibration artifact and a base model into one
certifier (``hybrid.HybridCertifier``). It imports the core and the domain packages, never the
workflows or the command line above it."""
