"""``python -m harmprune`` (needed by ``torchrun -m harmprune``)."""

from harmprune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
