"""Errors of the Paillier aggregation path (see mpc_rec.errors for the tree and exit codes)."""

from __future__ import annotations

from mpc_rec.errors import InputError, PeerError


class AggregationError(PeerError):
    """A round cannot go on: a peer sent something unusable, or the parties disagree."""


class RejectedContribution(AggregationError):
    """One contributor's message was refused; the round goes on without it.

    ``contributor`` names the sender (as it claimed to be, or ``"?"`` when the message
    could not be read far enough to say), ``reason`` says what was wrong.
    """

    def __init__(self, contributor: str, reason: str):
        self.contributor = contributor
        self.reason = reason
        super().__init__(f"contributor '{contributor}' rejected: {reason}")


class ContributionInputError(InputError):
    """A contributor's own vector cannot be encoded (NaN, out of range, wrong length)."""

    def __init__(self, contributor: str, reason: str):
        self.contributor = contributor
        self.reason = reason
        super().__init__(f"contributor '{contributor}': {reason}")
