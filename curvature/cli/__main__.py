"""``python -m curvature.cli``: the ``curvature`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
