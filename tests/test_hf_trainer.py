"""MISA inside a transformers Trainer on a tiny randomly initialised LLaMA."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
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
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=2,
        save_strategy="no",
        gradient_checkpointing=grad_checkpointing,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )
    trainer = MISATrainer(
        model=model, args=args, train_dataset=dataset(), misa_kwargs=dict(delta=0.2, interval=2, backend="torch")
    )
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
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=2e-3,
        adam_beta1=0.85,
    )
    opt = create_misa_optimizer(model, args, delta=0.2, interval=2, backend="torch")
    assert opt.param_groups[0]["betas"][0] == 0.85 and opt.param_groups[0]["lr"] == 2e-3
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_partition_of_real_architectures(arch):
    import misa

    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
        want = {
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj",
        }
    elif arch == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64
            )
        )
        want = {
            "gpt_neox.layers.0.attention.query_key_value",
            "gpt_neox.layers.0.attention.dense",
            "gpt_neox.layers.0.mlp.dense_h_to_4h",
            "gpt_neox.layers.0.mlp.dense_4h_to_h",
        }
    else:
        model = tiny_llama()
        want = {
            f"model.layers.0.{n}"
            for n in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
        }
    opt = misa.MISA(model, delta=0.5, backend="torch", variant="paper")  # biases travel with their matrix
    layer0 = {n for n in opt.module_names if ".0." in n}
    assert layer0 == want
    assert len(opt.module_names) == 2 * len(want)  # embeddings and head are not modules by default
    del opt  # one MISA per model at a time
    with_embed = misa.MISA(
        model, delta=0.9, include_embedding=True, include_lm_head=True, backend="torch", variant="paper"
    )
    assert any("embed" in n or "wte" in n for n in with_embed.module_names)
    del with_embed
    layers = misa.MISA(model, delta=0.9, granularity="layer", backend="torch")
    assert len(layers.module_names) == 2


def test_trainer_on_a_bf16_model_keeps_fp32_masters(tmp_path):
    from transformers import TrainingArguments

    import misa
    from misa.integrations.hf import MISATrainer, unwrap_misa

    model = tiny_llama(2).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-4,
        max_grad_norm=1.0,
    )
    trainer = MISATrainer(
        model=model, args=args, train_dataset=dataset(), misa_kwargs=dict(delta=0.2, interval=10, backend="torch")
    )
    trainer.train()
    opt = unwrap_misa(trainer.optimizer)
    assert isinstance(opt, misa.MISA) and opt.state
    for p, st in opt.state.items():
        assert st["master"].dtype == torch.float32
        if st["step"] > 0:  # (a module selected at the last switch has not stepped yet)
            assert torch.equal(st["master"].to(torch.bfloat16), p.detach())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # at lr 1e-4 a bf16 model without masters would barely move
