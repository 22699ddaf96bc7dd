"""Federated training: data holders keep ratings and user factors; only Paillier-encrypted,
per-user-clipped item updates leave them, and the compute parties add DP noise in MPC.

- ``model``: the maths of a round (user ridge step, clipped item contribution, item step,
  per-user test figures, a vectorised synthetic generator); pure numpy.
- ``evaluation``: the evaluation round after the last: per-user clipped test sums, their
  packing, and their noised release (RMSE and recall@10 as post-processing).
- ``holder``: one data holder process (``mpc-rec holder``).
- ``compute``: one compute party (``mpc-rec federated-party``): holder channel, Paillier
  round, noise, reveal, item update, release.
- ``config``: the holder's and the compute party's TOML files.
- ``launch``: ``mpc-rec run --mode federated`` on one machine.

Specification: protocols/federated.md. Nothing is imported here (the CrypTen-dependent
code loads only in compute parties).
"""
