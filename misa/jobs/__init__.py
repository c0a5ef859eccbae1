"""What the jobs (`python -m misa.train`, `python -m misa.finetune`) share and the optimizer library never
needs: files written so that a kill at any instant leaves the old file or the new one, never half of one."""
