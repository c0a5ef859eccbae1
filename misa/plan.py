"""`python -m misa.plan`: the memory planner lives in misa/jobs/plan.py (the library imports no job)."""

import sys

from .jobs.plan import main, plan  # noqa: F401  (the planner as a function)

if __name__ == "__main__":
    sys.exit(main())
