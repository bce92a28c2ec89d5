"""Where tensors live: tiers (device, host, disk), aligned disk I/O and the copy engine.

Nothing here knows about models; `engine/` joins this package with `models/`.
"""
