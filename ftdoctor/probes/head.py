"""What kind of head the backbone sits under, seen on the data: a maximum-entropy head or an ordinary one.

ENTAME's head (§5, eq. 21: ``W ~ N(0, φ_w)``, φ_w = 1e-12, ``b = 0``) makes the
model's output uniform: every example's logits agree to within ~1e-4. That is
its purpose (no noise in the first error, eqs. 13–17), and it scales every
gradient reaching the backbone by ‖W‖ ≈ 1e-6. At step 0 the backbone's change
rates (Krähenbühl et al. §3) and its cross-entropy gradients (RIFLE Fig. 2) are
then ~1e-6 of the head's, by design: the head learns first and the backbone
follows once the head has grown. Figures that compare the backbone with the
head (``spread``, ``depth_ratio``) measure that design, not the backbone; the
change-rate and gradient-norm probes therefore also report backbone-only
figures (the head left out) and judge those when the head is a maximum-entropy
one. A feature-normalised head (eq. 20, ``FeatureNormLinear``) is named so.

The head is recognised on the data, not from its weights, so a rescaled or
differently drawn maximum-entropy head is recognised too: the mean over
examples of the range of the logits (max − min over classes) is at most
:data:`MAX_ENTROPY_LOGIT_RANGE`, i.e. every ŷ within ~1% of uniform.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ftdoctor.featurenorm import FeatureNormLinear

if TYPE_CHECKING:
    from ftdoctor.engine.batch import Batch

#: mean logit range (max − min over classes) at or below which the head counts as maximum-entropy
MAX_ENTROPY_LOGIT_RANGE = 1e-2

ORDINARY = "ordinary"
MAX_ENTROPY = "max-entropy"
FEATURE_NORM_MAX_ENTROPY = "feature-normalised max-entropy"


class HeadWatch:
    """Mixed into a probe: sums the per-example logit range, then names the head's kind.

    The probe calls :meth:`watch_head` in its ``__init__`` and :meth:`see_logits` in ``update`` (the batch
    computes the range once for every probe); both sums add across processes like every other state.
    """

    def watch_head(self) -> None:
        self.add_state("logit_range", torch.zeros((), dtype=torch.float64))  # type: ignore[attr-defined]
        self.add_state("logit_examples", torch.zeros((), dtype=torch.float64))  # type: ignore[attr-defined]

    def see_logits(self, batch: "Batch") -> None:
        if batch.logits.dim() != 2 or batch.logits.numel() == 0:
            return
        self.logit_range += batch.logit_range_sum()   # type: ignore[attr-defined]
        self.logit_examples += batch.logits.shape[0]  # type: ignore[attr-defined]

    def head_kind(self) -> str:
        n = float(self.state("logit_examples"))  # type: ignore[attr-defined]
        if n <= 0:
            return ORDINARY
        mean_range = float(self.state("logit_range")) / n  # type: ignore[attr-defined]
        if not mean_range <= MAX_ENTROPY_LOGIT_RANGE:
            return ORDINARY
        head = self.ctx.head.module  # type: ignore[attr-defined]
        return FEATURE_NORM_MAX_ENTROPY if isinstance(head, FeatureNormLinear) else MAX_ENTROPY


def is_max_entropy(kind: str | None) -> bool:
    return kind in (MAX_ENTROPY, FEATURE_NORM_MAX_ENTROPY)


def left_out(kind: str, head: str) -> str:
    """Why the head is left out of a backbone figure, in words for a verdict."""
    return f"{kind} head {head} left out: it learns first by design, ENTAME §5"
