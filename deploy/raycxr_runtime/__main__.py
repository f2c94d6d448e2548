"""``python -m raycxr_runtime``: the same as the ``raycxr-infer`` command."""

from .cli import main

raise SystemExit(main())
