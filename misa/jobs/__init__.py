"""The jobs built on the library, and what only they use: `python -m misa.train` (train.py: the main job, on
the built-in model and data), `python -m misa.finetune` (finetune.py, with pretrained.py for its cached base and
finetune_report.py for its table and verdicts), `python -m misa.plan` (plan.py, with device_model.py and
configs/), the built-in model (model.py) and corpora (data.py), the worst active set a budget allows
(worst_set.py), atomic result files (files.py) and provenance (provenance.py). `import misa` loads none of them;
they need the `jobs` extra (matplotlib, tqdm): `pip install misa-kernels[jobs]`."""
