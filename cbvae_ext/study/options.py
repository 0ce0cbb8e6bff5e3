"""The study analysis' options and thresholds, apart from its computation (which imports torch): the command line
reads them to parse its arguments, and refuses a bad file before loading a run."""

from __future__ import annotations

__all__ = ["ATYPICAL_PERCENTILE", "OUTSIDE", "READING_MARGIN", "TYPICALITY_SCORES"]

#: What to do with peaks outside the brain mask: drop them (the dataset builder's rule) or keep them.
OUTSIDE = ("drop", "keep")
#: Below this typicality percentile a study gets a plain "atypical" warning.
ATYPICAL_PERCENTILE = 5.0
#: An alternative reading of the peaks (Talairach labelled MNI, x flipped) that is this many percentile points more
#: typical than the study as given triggers a warning naming that reading.
READING_MARGIN = 25.0
#: Typicality scores: ``peak_density`` (mean log density of the model's prior-predictive map at the study's peak
#: voxels, per peak, so comparable between studies of any size) and ``elbo`` (the whole-map ELBO plus its entropy
#: floor, which grows with the number of peaks). On the 1k run's validation split the peak density separates
#: corrupted copies far better (random peaks: AUC 0.83 vs 0.61, 10 mm shifts 0.76 vs 0.50): it is the default.
#: (name -> its term in ``StudyContext.score``; the first is the default)
TYPICALITY_SCORES = {"peak_density": "peak_density", "elbo": "elbo_score"}
