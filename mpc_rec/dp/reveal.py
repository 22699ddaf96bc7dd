"""Reveal discipline: nothing leaves the shares unless it was noised or declared public.

The MPC code wraps every value it may open in a ``Tagged`` value, made either by
``noised`` (the value derives from an aggregate noised under a ``NoisePlan``, at a given
release of it) or by ``declare_public`` (with a reason, e.g. "catalogue size"), and
routes every opening through ``guard_reveal``. Anything else raises
``UnnoisedRevealError``. An optional ``RevealLog`` keeps what was revealed and why, for
the run record.

This is a discipline for code paths, not a security boundary: a tag says what the
code that made it claims. Its value is that an untagged or mistyped reveal fails
loudly in tests instead of leaking silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mpc_rec.errors import MpcRecError

T = TypeVar("T")
RELEASES = ("step", "mean")


class UnnoisedRevealError(MpcRecError):
    """An attempt to reveal a value that is neither noised nor declared public."""


@dataclass(frozen=True)
class Noised:
    plan_digest: str
    release: str  # "step" or "mean"
    index: int  # which step (0-based), or which mean release
    aggregate: str = ""


@dataclass(frozen=True)
class DeclaredPublic:
    reason: str


@dataclass(frozen=True)
class Tagged(Generic[T]):
    value: T
    tag: Noised | DeclaredPublic

    def __repr__(self) -> str:  # never print the (possibly shared) value itself
        return f"Tagged(<{type(self.value).__name__}>, {self.tag!r})"


def noised(value: T, *, plan, release: str, index: int, aggregate: str = "") -> Tagged[T]:
    """Tag ``value`` as derived from release ``index`` of ``plan`` (checked against the plan)."""
    if release not in RELEASES:
        raise UnnoisedRevealError(f"unknown release {release!r}; expected one of {RELEASES}")
    limit = plan.steps if release == "step" else plan.mean_releases
    if not (isinstance(index, int) and 0 <= index < limit):
        raise UnnoisedRevealError(f"{release} {index!r} is not covered by the noise plan (it has {limit})")
    return Tagged(value, Noised(plan.digest(), release, index, aggregate))


def declare_public(value: T, *, reason: str) -> Tagged[T]:
    if not isinstance(reason, str) or not reason.strip():
        raise UnnoisedRevealError("declaring a value public needs a reason")
    return Tagged(value, DeclaredPublic(reason.strip()))


@dataclass
class RevealLog:
    """What was revealed under which tag, in order (values are not kept)."""

    plan_digest: str | None = None
    entries: list[tuple[str, Noised | DeclaredPublic]] = field(default_factory=list)


def guard_reveal(tagged: Any, *, name: str = "", log: RevealLog | None = None) -> Any:
    """The value inside ``tagged`` if it may be revealed; ``UnnoisedRevealError`` otherwise.

    With a ``log`` that names a plan digest, noised values of any other plan are refused.
    """
    if not isinstance(tagged, Tagged):
        raise UnnoisedRevealError(
            f"refusing to reveal {name or type(tagged).__name__}: not noised and not declared public"
        )
    tag = tagged.tag
    if isinstance(tag, Noised):
        if log is not None and log.plan_digest is not None and tag.plan_digest != log.plan_digest:
            raise UnnoisedRevealError(f"refusing to reveal {name or 'value'}: noised under another plan")
    elif not (isinstance(tag, DeclaredPublic) and tag.reason):
        raise UnnoisedRevealError(f"refusing to reveal {name or 'value'}: invalid tag {tag!r}")
    if log is not None:
        log.entries.append((name, tag))
    return tagged.value
