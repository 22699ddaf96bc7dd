"""Paillier aggregation: many contributors' vectors into the compute parties' CrypTen shares.

Roles: contributors encrypt packed fixed-point vectors (contributor.py); the aggregator,
compute party 1, checks and sums them and masks the sum (aggregator.py); the key holder,
compute party 0, decrypts only the masked sum (keyholder.py). The two local results are
additive shares mod 2^64 of the totals (party.py turns them into an MPCTensor). Protocol,
proofs and assumptions: protocols/paillier-aggregation.md. The CrypTen-dependent module
(party.py) and the process simulation are not imported here.
"""

from mpc_rec.paillier._crypto import HAVE_GMPY2
from mpc_rec.paillier.aggregator import AggregationRound, Aggregator, RoundReport, RoundResult
from mpc_rec.paillier.contributor import make_contribution
from mpc_rec.paillier.errors import AggregationError, ContributionInputError, RejectedContribution
from mpc_rec.paillier.keyholder import KeyHolder
from mpc_rec.paillier.keys import (
    PrivateKey, PublicKey, fingerprint_of, generate_keypair, load_private_key, load_public_key,
    save_private_key, save_public_key,
)
from mpc_rec.paillier.messages import Contribution, LocalShare, MaskedSum
from mpc_rec.paillier.packing import PackingError, PackingSpec

__all__ = [
    "HAVE_GMPY2", "AggregationError", "AggregationRound", "Aggregator", "Contribution",
    "ContributionInputError", "KeyHolder", "LocalShare", "MaskedSum", "PackingError", "PackingSpec",
    "PrivateKey", "PublicKey", "RejectedContribution", "RoundReport", "RoundResult", "fingerprint_of",
    "generate_keypair", "load_private_key", "load_public_key", "make_contribution", "save_private_key",
    "save_public_key",
]
