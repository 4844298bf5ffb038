"""What each check of ``ftdoctor check`` passes on, in words: the one list behind the SARIF rules and the
documentation's table (``ftdoctor.check``'s docstring)."""
from __future__ import annotations

#: check name -> (what it guards, the paper or rule it comes from)
CHECKS: dict[str, tuple[str, str]] = {
    "pickle_safe": ("No pickle in the checkpoint names a global that can act (code run for whoever loads it "
                    "with full unpickling).", "ftdoctor.checkpoint.pickle_rules"),
    "loadable": ("The file loads into a model.", "SPEC 3"),
    "require_finite": ("No NaN or Inf in any parameter or buffer.", "SPEC 1.6"),
    "head_found": ("The model has an affine head (its last Linear or Conv layer).", "SPEC 1"),
    "expect_num_classes": ("The head has the expected number of outputs.", "SPEC 4"),
    "max_drift_rel": ("Every layer's relative weight drift from the reference stays below the bound.", "L2-SP Ω"),
    "runs_on_data": ("The model runs on the data and its head matches the data's classes.", "SPEC 4"),
    "max_noise_fraction": ("The noise fraction ζ/φ of the head's back-propagated error stays below the bound.",
                           "ENTAME Table 1"),
    "max_excess_noise_fraction": ("The excess noise fraction (ζ − 1/C)/φ stays below the bound.", "ENTAME eq. 21"),
    "max_change_rate_spread": ("The spread max/min of the layers' change rates stays below the bound.",
                               "Krähenbühl et al. Fig. 1a"),
    "max_change_rate_cv": ("Every layer's within-layer change-rate cv stays below the bound.",
                           "Krähenbühl et al. Fig. 1b"),
    "min_depth_ratio": ("The first layer's gradient norm over the head's stays above the bound.", "RIFLE Fig. 2"),
    "min_r2_median": ("Every matched layer's median activation R² against the reference stays above the bound.",
                      "L2-SP Fig. 4"),
}


def describe(name: str) -> tuple[str, str]:
    """(what the check guards, where it comes from); a check from a plug-in probe gets a generic line."""
    return CHECKS.get(name, (f"The threshold {name} holds.", "a registered probe"))
