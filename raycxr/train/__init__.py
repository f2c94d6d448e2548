"""Training: the schedule driver (``driver``), the single-process runner (``local``), the Ray Train
runner (``ray_runner``, launched through ``ray_launch``), validation, and the supervised fine-tuning loop
(``supervised``) that downstream evaluation and segmentation share."""
