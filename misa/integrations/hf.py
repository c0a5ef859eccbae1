"""Hugging Face Trainer integration (needs `pip install misa-kernels[hf]`).

    from misa.integrations.hf import MISATrainer
    trainer = MISATrainer(model=model, args=args, train_dataset=ds, misa_kwargs=dict(delta=0.03, eta=1.0))
    trainer.train()

or, with a plain Trainer: `Trainer(..., optimizers=(create_misa_optimizer(model, args, delta=0.03), None))`
(the scheduler is then built by the Trainer as usual). MISATrainer also clips gradients with MISA's
fused norm pass, whose per-module norms the next step reuses, and adds MISA's trainable
fraction, active-module count and skipped steps to the training logs.
"""

from __future__ import annotations

from typing import Optional

from transformers import Trainer, TrainingArguments

from ..optimizer import MISA


def create_misa_optimizer(model, args: TrainingArguments, **misa_kwargs) -> MISA:
    """MISA with the Trainer's AdamW hyperparameters (learning rate, betas, epsilon, weight decay)."""
    kwargs = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    kwargs.update(misa_kwargs)
    return MISA(model, **kwargs)


def unwrap_misa(optimizer) -> Optional[MISA]:
    """The MISA inside accelerate's AcceleratedOptimizer (or any wrapper with `.optimizer`)."""
    while optimizer is not None and not isinstance(optimizer, MISA):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class MISATrainer(Trainer):
    def __init__(self, *args, misa_kwargs: Optional[dict] = None, **kwargs):
        self.misa_kwargs = dict(misa_kwargs or {})
        super().__init__(*args, **kwargs)
        checkpointing = getattr(self.args, "activation_checkpointing", False) or getattr(
            self.args, "gradient_checkpointing", False
        )  # renamed in transformers 5
        if checkpointing and hasattr(self.model, "enable_input_require_grads"):
            # Frozen embeddings feed checkpointed blocks inputs that need no grad; with reentrant
            # checkpointing the blocks' weights would then get none. Same fix as PEFT uses.
            self.model.enable_input_require_grads()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_misa_optimizer(
                model if model is not None else self.model, self.args, **self.misa_kwargs
            )
        return self.optimizer

    def _clip_grad_norm(self, model):
        opt = unwrap_misa(self.optimizer)
        if opt is None:
            return super()._clip_grad_norm(model)
        return opt.clip_grad_norm_(self.args.max_grad_norm)

    def log(self, logs, *args, **kwargs):
        opt = unwrap_misa(self.optimizer)
        if opt is not None and "loss" in logs:  # training logs, not evaluation
            logs = dict(
                logs,
                misa_trainable_fraction=opt.trainable_fraction,
                misa_active_modules=len(opt.active_modules),
                misa_skipped_steps=opt.skipped_steps,
            )
        return super().log(logs, *args, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        opt = unwrap_misa(self.optimizer)
        if grad_norm is None and opt is not None:
            grad_norm = opt.clip_grad_norm_(float("inf"))  # a norm without clipping, reused by step()
        return super()._get_grad_norm(model, grad_norm=grad_norm)
