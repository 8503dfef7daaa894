"""Training behaviour of a transformed graph: gradients, frozen base, train/eval switch."""

import torch
import torch.nn.functional as F
from conftest import METHODS, randomize_adapters, small_config, tiny

import malora_fx as mf


def _lm_loss(gm, batch):
    logits = gm(**batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def test_gradients_reach_only_adapters_and_base_stays_bit_identical():
    model, batch = tiny("tiny-llama")
    for method in METHODS:
        gm = mf.transform(model, small_config(method), batch)
        randomize_adapters(gm, std=0.02)
        trainable = mf.trainable_parameters(gm)
        trainable_ids = {id(p) for p in trainable}
        base = {name: p.detach().clone() for name, p in gm.named_parameters() if id(p) not in trainable_ids}
        assert base and trainable
        assert all(not p.requires_grad for n, p in gm.named_parameters() if id(p) not in trainable_ids)
        adapters_before = [p.detach().clone() for p in trainable]
        opt = torch.optim.AdamW(trainable, lr=1e-2)
        for _ in range(3):
            loss = _lm_loss(gm, batch) + 0.01 * mf.aux_loss(gm, batch["attention_mask"])
            loss.backward()
            assert all(p.grad is None for n, p in gm.named_parameters() if id(p) not in trainable_ids)
            assert all(p.grad is not None for p in trainable)
            opt.step()
            opt.zero_grad()
        for name, p in gm.named_parameters():
            if id(p) not in trainable_ids:
                assert torch.equal(p, base[name]), name
        assert all(not torch.equal(a, p) for a, p in zip(adapters_before, trainable))


def test_trainable_parameter_count_matches_formulas():
    model, batch = tiny("tiny-gpt2")
    from malora_fx.adapters.accounting import count_sites
    from malora_fx.passes import STATE_KEY
    for method in METHODS:
        gm = mf.transform(model, small_config(method), batch)
        expected = sum(c.parameters for c in count_sites(mf.get_config(gm), gm.meta[STATE_KEY]["sites"]))
        assert sum(p.numel() for p in mf.trainable_parameters(gm)) == expected


def test_set_adapters_training_switches_dropout():
    model, batch = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora", dropout=0.5), batch)
    randomize_adapters(gm)
    assert all(layer.training for layer in mf.adapter_layers(gm).values())
    mf.set_adapters_training(gm, False)
    assert not any(layer.training for layer in mf.adapter_layers(gm).values())
    assert torch.equal(gm(**batch).logits, gm(**batch).logits)
    mf.set_adapters_training(gm, True)
    torch.manual_seed(0)
    first = gm(**batch).logits
    torch.manual_seed(1)
    assert not torch.equal(first, gm(**batch).logits)


def test_aux_loss_ignores_padding_tokens():
    model, batch = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora"), batch)
    randomize_adapters(gm, std=0.2)
    ids = batch["input_ids"][:, :6]
    gm(input_ids=ids, attention_mask=torch.ones_like(ids))
    plain = mf.aux_loss(gm, torch.ones_like(ids))
    padded = torch.cat([ids, torch.full((2, 3), 5)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 3, dtype=torch.long)], dim=1)
    gm(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(mf.aux_loss(gm, mask), plain, atol=1e-6, rtol=1e-6)
    assert abs(mf.aux_loss(gm).item() - plain.item()) > 1e-4  # unmasked, padding would count
