"""`python -m misa.train`: the job lives in misa/jobs/train.py (the library imports no job)."""

import sys

from .jobs.train import main

if __name__ == "__main__":
    sys.exit(main())
