"""``raycxr study``: does multi-source pretraining give a better encoder, in and out of distribution?

The domain-pretraining protocol (``Krones (arXiv:2605.08819)``) as a command: every pretraining strategy
(a *row*: random init, the baselines, Ark, UniChest, self-supervised and image-report objectives, and
any method registered later) is trained at the same budget, then transferred to one target site by
linear probe, fine-tuning at 1 / 10 / 100 % of its training images and LP-FT, with several seeds, and
scored on the target's test split (in-distribution) and every other site's (out-of-distribution).
The report checks the claims of the papers behind raycxr on its own corpus.

- :mod:`.run`: the plan, the corpus, running cells (in this process or as Ray tasks), resume;
- :mod:`.cells`: one cell of work and its cached result;
- :mod:`.analysis`: tables, paired-bootstrap contrasts, reliability curves, claims;
- :mod:`.report`: Markdown, HTML and plots.
"""

from .run import run_study

__all__ = ["run_study"]
