"""Group-level statistics engine of brainage (public API).

Plain-array functions that the group runner, the report and later model issues
share: Welch t / Cohen's d / Bonferroni (seed 000 eqs. 1–3), Welch ANOVA and
Games–Howell (seed 004), two-sample Z and Kolmogorov–Smirnov tests (seeds 004, 001),
correlations incl. sliding age windows (seed 002), age-bias corrections (seed 000
eqs. 6–9, seed 004), ICC (Shrout & Fleiss; seed 000 eq. 4), TFCE and
randomise-equivalent permutation inference.
"""

from ._bias import (BIAS_METHODS, AgeBinBiasCorrection, LinearBiasCorrection, age_bins,
                    bias_correction_from_dict, fit_bias_correction)
from ._icc import ICC_KINDS, icc, icc_fisher_pairs
from ._permutation import PermutationResult, count_relabellings, permutation_test
from ._tfce import tfce_thresholds, tfce_transform
from ._univariate import (TestResult, bonferroni, cohens_d, correlate_covariates, games_howell,
                          ks_2samp, pearson, sliding_window_correlations, welch_anova, welch_ttest,
                          ztest_2samp)

__all__ = [
    "AgeBinBiasCorrection",
    "BIAS_METHODS",
    "ICC_KINDS",
    "LinearBiasCorrection",
    "PermutationResult",
    "TestResult",
    "age_bins",
    "bias_correction_from_dict",
    "bonferroni",
    "cohens_d",
    "correlate_covariates",
    "count_relabellings",
    "fit_bias_correction",
    "games_howell",
    "icc",
    "icc_fisher_pairs",
    "ks_2samp",
    "pearson",
    "permutation_test",
    "sliding_window_correlations",
    "tfce_thresholds",
    "tfce_transform",
    "welch_anova",
    "welch_ttest",
    "ztest_2samp",
]
