"""`python -m misa.finetune`: the job lives in misa/jobs/finetune.py (the library imports no job)."""

import sys

from .jobs.finetune import main

if __name__ == "__main__":
    sys.exit(main())
