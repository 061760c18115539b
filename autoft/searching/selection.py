"""Which model ships: the trials' model (the best trial, or an ensemble of trials) or a simple
candidate, whichever is better on the same evidence.

The simple models (:mod:`autoft.training.candidates`) are fitted on exactly the trials' splits before
the first trial, so a candidate's value and a trial's are the same metric on the same held-out
images. A candidate ships only when it is better than what the trials would ship, and sure to
be: on a tie the fine-tuned network wins, being the model the user asked autoft to train, and
so it does when the candidate's lead is one the images cannot vouch for (better on fewer than
:data:`~autoft.searching.finishing.ENSEMBLE_CONFIDENCE` of their bootstrap resamples, the rule
an ensemble meets to replace a single model). With no completed trial at all (a budget that
bought only the simple models, or trials that all failed) the best candidate ships instead of
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autoft.errors import AutoftError
from autoft.core.events import Refit
from autoft.model.ensemble import bootstrap_wins
from autoft.searching.finishing import ENSEMBLE_CONFIDENCE, Evidence, FinalModel, evidence_score
from autoft.searching.session import Session, metric_sign

if TYPE_CHECKING:
    from autoft.training.candidates import Candidate


TIE_TOLERANCE = 1e-9  # scores closer than this are equal: means over folds, summed in another order, differ in their last bits


@dataclass(frozen=True)
class Verdict:
    """The candidate that ships (None: the trials' model), and the one line that says why."""

    candidate: "Candidate | None"
    reason: str | None = None


def best_candidate(session: Session) -> "Candidate | None":
    sign = metric_sign(session.ctx)
    return max(session.ctx.candidates, key=lambda c: sign * c.value, default=None)


def judge(session: Session, trials_value: float | None, trials_model: str, evidence: Evidence | None = None) -> Verdict:
    """Compare the trials' model, scored ``trials_value`` (None: no trial completed), with the
    best candidate; ``evidence``, the trials' model's (pool indices, probabilities) for the
    images it was scored on, says how sure a lead is (without it, any lead ships the candidate)."""
    top = best_candidate(session) if session.ctx.config.simple_models else None
    if top is None:
        return Verdict(None)
    if trials_value is None:
        return Verdict(top, f"{top.name} ships: no trial completed, and it scored {top.value:.4f} on the same splits")
    sign = metric_sign(session.ctx)
    if sign * top.value <= sign * trials_value + TIE_TOLERANCE:  # a tie, to the last bits of a mean over folds, is the network's
        return Verdict(None)
    sure = _sureness(session, top, evidence)
    if sure is not None and sure < ENSEMBLE_CONFIDENCE:
        session.state.notes.append(f"{top.name} scored {top.value:.4f} on the same splits against the {trials_model}'s {trials_value:.4f}, above it on "
                                   f"{sure:.0%} of the bootstrap resamples of the {len(evidence[0])} images: too unsure a lead to ship it over the trained network")  # fmt: skip
        return Verdict(None)
    return Verdict(top, f"{top.name} ships: it scored {top.value:.4f} on the same splits, above the {trials_model}'s {trials_value:.4f}")


def _sureness(session: Session, candidate: "Candidate", evidence: Evidence | None) -> float | None:
    """The share of the bootstrap resamples of ``evidence``'s images on which ``candidate``
    scores above the trials' model; None when the candidate did not predict them all."""
    if evidence is None or not len(evidence[0]):
        return None
    index, probabilities = evidence
    held_out = candidate.predicted(index)
    if held_out is None:
        return None
    labels, score, sign = session.ctx.pool.labels.numpy()[index], evidence_score(session), metric_sign(session.ctx)
    return bootstrap_wins(held_out, probabilities, labels, lambda y, p: sign * score(y, p))


def candidate_final(session: Session, candidate: "Candidate", reason: str) -> FinalModel:
    """The candidate fitted on every labelled image, as ``best/``'s one member."""
    ctx = session.ctx
    work = ctx.out / "refit"
    work.mkdir(parents=True, exist_ok=True)
    session.emit(Refit(number=None, steps=0, images=len(ctx.pool), model=candidate.name))
    try:
        path = candidate.refit(work / candidate.file_name, data=ctx.data_source, seed=ctx.config.seed)
    except (ValueError, RuntimeError) as exc:  # a fit scikit-learn refuses (one class left, say): say so, do not crash
        raise AutoftError(f"could not fit {candidate.name} on every labelled image: {exc}") from None
    return FinalModel([path], [1.0], [], {"images": len(ctx.pool), "labelled": len(ctx.pool), "steps": 0}, candidate=candidate.name, reason=reason)
