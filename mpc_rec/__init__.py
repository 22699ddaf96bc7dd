"""mpc-rec: secure multiparty matrix-factorization recommendations."""

__version__ = "0.1.0"
