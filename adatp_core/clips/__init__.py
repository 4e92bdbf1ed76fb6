"""From long footage to a training set (issue 29): shots, clips planned to the trainers'
rules, and cut. Torch-free: detection and cutting use PyAV only.

shots.py finds the shots, plan.py turns shots into clips (lengths, frame counts, sizes,
names), cut.py writes the clips. The job, outputs, CLI and node are built on these
(job.py, outputs.py).
"""

from .cut import CutResult, cut_clips
from .plan import ClipPlan, ClipRules, plan_clips, source_key
from .shots import DEFAULT_THRESHOLD, Shot, detect_shots

__all__ = ["DEFAULT_THRESHOLD", "ClipPlan", "ClipRules", "CutResult", "Shot", "cut_clips", "detect_shots",
           "plan_clips", "source_key"]
