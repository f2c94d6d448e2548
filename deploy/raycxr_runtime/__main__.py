"""``python -m raycxr_runtime``: the same as the ``raycxr-infer`` command."""

from .cli import main

if __name__ == "__main__":  # not when imported (e.g. by a tool that loads modules by name)
    raise SystemExit(main())
