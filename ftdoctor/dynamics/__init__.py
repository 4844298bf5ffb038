"""``ftdoctor trace`` and ``ftdoctor compare``: real fine-tuning runs that record the dynamics (SPEC §5).

A probe is a snapshot; fine-tuning is a process. :func:`fine_tune` runs one
method for one seed from a pretrained model's backbone and a fresh head, and
records per step (SPEC §3, trace layout):

* ``loss``, ``train_acc`` and ``lr`` (the head's rate; ``backbone_lr`` too);
* ``grad_norm`` — ‖∇_W L‖_F of every affine layer's weight after the
  backward (RIFLE §4.6.1, Fig. 2), steps × layers;
* ``feature_var`` — the variance across the batch of the head's input x^L,
  averaged over features (ENTAME §3.3, Fig. 1);
* ``noise_fraction`` — ζ/φ of the batch (ENTAME eq. 12, Table 1);
* ``sp_penalty`` — Σ_k ‖W_k − W⁰_k‖² over the backbone's affine weights (L2-SP's Ω);
* ``eval_step`` / ``eval_acc`` — accuracy on the evaluation split after
  each of the first ``window`` steps and every ``eval_every`` steps after
  (ENTAME Table 3 averages the first ten).

Methods (every one starts from the same backbone; the head is new):
``base`` He-initialised head (ENTAME's baseline); ``warmup`` the same plus
``warmup_steps`` head-only steps; ``entame`` the maximum-entropy head
(ENTAME eq. 21); ``entame-fn`` that plus the feature normalisation of eq. 20;
``rifle`` RIFLE Alg. 1 (head re-initialised every period, cosine-restart head
rate); ``l2sp`` base plus the L2-SP penalty (Li et al. 2018 eq. 3).

:func:`compare` runs methods × seeds where, per seed, every method sees the
same starting backbone and the same batches in the same order — checked, not
assumed: each run records a digest of its starting backbone and of the
example indices it consumed, and the comparison refuses to report if they
differ.
"""
from __future__ import annotations

from ftdoctor.dynamics.finetune import (
                                        Examples,
                                        accuracy,
                                        batch_noise_fraction,
                                        batch_plan,
                                        feature_variance,
                                        fine_tune,
                                        prepare_model,
)
from ftdoctor.dynamics.options import (
                                        COMPARE_SCHEMA,
                                        HEAD_INIT,
                                        METHODS,
                                        SCHEMA,
                                        SERIES,
                                        TraceOptions,
)
from ftdoctor.dynamics.render import demo_compare_step, render_compare, render_trace
from ftdoctor.dynamics.run import compare, compare_model, trace, trace_model, write_hdf5
from ftdoctor.dynamics.series import (
                                        CompareResult,
                                        MethodSummary,
                                        RunSeries,
                                        TraceResult,
                                        check_paired,
                                        summarise,
)

__all__ = ["COMPARE_SCHEMA", "HEAD_INIT", "METHODS", "SCHEMA", "SERIES", "CompareResult", "Examples",
           "MethodSummary", "RunSeries", "TraceOptions", "TraceResult", "accuracy", "batch_noise_fraction",
           "batch_plan", "check_paired", "compare", "compare_model", "demo_compare_step", "feature_variance",
           "fine_tune", "prepare_model", "render_compare", "render_trace", "summarise", "trace", "trace_model",
           "write_hdf5"]
