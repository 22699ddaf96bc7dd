"""Serving on the holder's side (protocols/serving.md).

- ``embeddings``: each user's vector fitted locally against the released item factors,
  stored compressed (int8 or float16).
- ``index``: top-k over the released item factors, exact (numpy) or HNSW (faiss).
- ``explain``: the model's own reason for a score, split exactly over the user's items.
- ``holder``: a holder's folder (ratings, controls, embeddings) and ``recommend``.
- ``cold_start``: noisy per-cohort popularity computed in MPC (distributed discrete
  Gaussian, accounted and booked in the ledger).
- ``refine``: the joint model kept as each compute party's shares, and the hybrid
  re-ranking of a holder's candidates in MPC.
- ``processes``: start the compute parties and the dealer of a serving session locally.
"""
