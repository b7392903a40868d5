import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.models import BUILTIN_TINY, apply_lora, load_causal_lm, load_reward_model, load_tokenizer
from rlhf.runtime import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_tokenizer_round_trip_and_specials(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("17+25=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7  # BOS + one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "17+25="
    assert tok.pad_token_id != tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}],
                                   tokenize=False)
    assert chat == "<s><|user|>1+2=\n<|assistant|>3</s>"


def test_tiny_model_is_deterministic_and_small():
    a, b = load_causal_lm(BUILTIN_TINY), load_causal_lm(BUILTIN_TINY)
    n = sum(p.numel() for p in a.parameters())
    assert 1e5 < n < 5e6
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_small_builtin_model_has_30m_plus_parameters_and_the_tiny_tokenizer(tiny_tokenizer):
    from rlhf.models import BUILTIN_SMALL

    model = load_causal_lm(BUILTIN_SMALL)
    assert 30e6 < sum(p.numel() for p in model.parameters()) < 60e6
    assert model.config.vocab_size == len(tiny_tokenizer) and model.config.head_dim == 64
    assert load_tokenizer(BUILTIN_SMALL).get_vocab() == tiny_tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="there are builtin:tiny, builtin:small"):
        load_causal_lm("builtin:smal")


def test_saved_tiny_loads_with_plain_transformers(tiny_model_dir, tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok("3+4=")["input_ids"] == tiny_tokenizer("3+4=")["input_ids"]
    ours = load_causal_lm(BUILTIN_TINY)
    x = tok(["3+4="], return_tensors="pt")
    assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False),
                       ours.generate(**x, max_new_tokens=4, do_sample=False))
    assert (tiny_model_dir / "model.safetensors").exists()


def test_save_hf_model_does_not_import_deepspeed(tmp_path):
    # transformers' save_pretrained would import DeepSpeed (0.6 CPU s) through accelerate's unwrapping
    code = (
        "import sys, torch; from rlhf.distributed import make_accelerator, save_hf_model; "
        "from rlhf.models import load_causal_lm, load_tokenizer; "
        "m = load_causal_lm('builtin:tiny'); "
        f"save_hf_model(make_accelerator(), m, {str(tmp_path / 'model')!r}, load_tokenizer('builtin:tiny')); "
        f"back = load_causal_lm({str(tmp_path / 'model')!r}); "
        "same = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values())); "
        "print('deepspeed' in sys.modules, same)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout


def test_reward_model_scores_last_non_pad_token(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    rm = load_reward_model(str(tiny_model_dir)).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    batch = tiny_tokenizer(["1+2=3", "10+20=30"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = rm(**batch).logits[:, 0]  # (B,)
        alone = rm(**tiny_tokenizer(["1+2=3"], return_tensors="pt")).logits[0, 0]
    assert torch.allclose(padded[0], alone, atol=1e-5)
    builtin = load_reward_model(BUILTIN_TINY)
    assert builtin.config.num_labels == 1


def test_tokenizer_without_pad_token(tmp_path, tiny_tokenizer, caplog):
    tiny_tokenizer.save_pretrained(tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "none")
    with pytest.raises(ConfigError, match="neither a pad token nor an EOS token"):
        load_tokenizer(str(tmp_path / "none"))


def test_apply_lora_trains_only_adapters():
    model = apply_lora(load_causal_lm(BUILTIN_TINY), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rm = apply_lora(load_reward_model(BUILTIN_TINY), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    assert any("score" in n for n, p in rm.named_parameters() if p.requires_grad)


def test_disable_dropout_makes_train_mode_deterministic(dropout_model_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhf.models import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(dropout_model_dir).train()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    torch.manual_seed(0)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout 0.1 is on
    assert disable_dropout(model) is model
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.attn_pdrop == model.config.resid_pdrop == model.config.embd_pdrop == 0.0
    # a dropout kept as a float attribute and read in forward (Llama's attention_dropout)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.5))
    disable_dropout(llama)
    assert llama.model.layers[0].self_attn.attention_dropout == 0.0 and llama.config.attention_dropout == 0.0


def test_expand_layers_is_the_identity_at_init_and_trains(tiny_model_dir, tiny_tokenizer):
    batch = tiny_tokenizer(["17+25=42</s>", "3+4=7</s>"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    plain = load_reward_model(str(tiny_model_dir)).eval()
    torch.manual_seed(0)  # the same new score head
    expanded = load_reward_model(str(tiny_model_dir), expand=2).eval()
    assert expanded.config.num_hidden_layers == len(expanded.model.layers) == plain.config.num_hidden_layers + 2
    new = expanded.model.layers[-1]
    assert torch.equal(new.self_attn.q_proj.weight, plain.model.layers[-1].self_attn.q_proj.weight)  # a copy
    assert new.self_attn.o_proj.weight.abs().sum() == 0 and new.mlp.down_proj.weight.abs().sum() == 0
    with torch.no_grad():
        a, b = plain(**batch, output_hidden_states=True), expanded(**batch, output_hidden_states=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.hidden_states[-1], b.hidden_states[-1])  # after the final norm
    # the new layers are not inert: their output projections get a gradient at once
    expanded.train()
    expanded(**batch).logits.sum().backward()
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0


def test_expanded_reward_model_saves_as_a_plain_model(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = load_reward_model(str(tiny_model_dir), expand=1).eval()
    with torch.no_grad():
        for p in rm.model.layers[-1].parameters():  # as after training: the new layer does something
            p.add_(0.05 * torch.randn_like(p))
    rm.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    batch = tiny_tokenizer(["17+25=42</s>"], return_tensors="pt")
    for back in (load_reward_model(str(tmp_path / "rm"), trained=True),
                 AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")):
        assert back.config.num_hidden_layers == rm.config.num_hidden_layers
        with torch.no_grad():
            assert torch.equal(back.eval()(**batch).logits, rm(**batch).logits)


def test_expand_layers_bad_values(dropout_model_dir):
    with pytest.raises(ConfigError, match="`expand_layers`: must be >= 0"):
        load_reward_model(BUILTIN_TINY, expand=-1)
    with pytest.raises(ConfigError, match="`expand_layers`: supported for Llama-family models.*'gpt2'"):
        load_reward_model(str(dropout_model_dir), expand=1)
