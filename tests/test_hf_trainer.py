"""MISA inside a transformers Trainer on a tiny randomly initialised LLaMA."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def dataset(n=16, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_trainer_runs_with_accumulation_and_clipping(tmp_path, monkeypatch, grad_checkpointing):
    from transformers import TrainingArguments

    import misa
    from misa.integrations.hf import MISATrainer

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clips = []
    real_clip = misa.MISA.clip_grad_norm_

    def spy(self, max_norm, norm_type=2.0):
        clips.append(max_norm)
        return real_clip(self, max_norm, norm_type)

    monkeypatch.setattr(misa.MISA, "clip_grad_norm_", spy)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=1e-3, report_to=[],
                             use_cpu=True, logging_steps=2, save_strategy="no",
                             gradient_checkpointing=grad_checkpointing, lr_scheduler_type="linear", warmup_steps=2)
    trainer = MISATrainer(model=model, args=args, train_dataset=dataset(),
                          misa_kwargs=dict(delta=0.2, interval=2, backend="torch"))
    result = trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, misa.MISA)
    assert trainer.state.global_step == 6 and torch.isfinite(torch.tensor(result.training_loss))
    assert clips == [0.5] * 6  # every optimizer step clipped through MISA's fused norms
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(any(n.startswith(m + ".") for m in opt.module_names) for n in changed)
    assert any("misa_trainable_fraction" in h for h in trainer.state.log_history)


def test_plain_trainer_with_factory(tmp_path):
    from transformers import Trainer, TrainingArguments

    from misa.integrations.hf import create_misa_optimizer

    model = tiny_llama(1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=2e-3, adam_beta1=0.85)
    opt = create_misa_optimizer(model, args, delta=0.2, interval=2, backend="torch")
    assert opt.param_groups[0]["betas"][0] == 0.85 and opt.param_groups[0]["lr"] == 2e-3
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == 3
