"""`python -m misa.plan`: the memory planner (misa/jobs/plan.py)."""

import sys

from .jobs.plan import main, plan  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
