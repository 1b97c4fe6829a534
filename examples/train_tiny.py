"""A tiny MoE language model trained on the CPU: the loss falls within a minute.

The MoE layer replaces the dense MLP of each transformer block; its load-balancing loss reaches the
gradients by itself (the training loop only back-propagates the LM loss).

    python examples/train_tiny.py [--steps 300] [--experts 8] [--top-k 2] [--capacity-factor 1.25]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmoe_kernels import MoELayer


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, moe_kwargs: dict):
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.RMSNorm(d_model)
        self.moe = MoELayer(d_model=d_model, **moe_kwargs)  # where a dense MLP would be
        self.n_heads = n_heads

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, D))
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, moe_kwargs: dict):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, moe_kwargs) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_batch(batch: int, seq: int, vocab: int, generator: torch.Generator):
    """Sequences that follow a fixed random successor table, so the next token is learnable."""
    table = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    tokens = [start]
    for _ in range(seq):
        tokens.append(table[tokens[-1]])
    seqs = torch.cat(tokens, dim=1)
    noise = torch.rand(seqs.shape, generator=generator) < 0.05  # a little noise keeps it honest
    seqs = torch.where(noise, torch.randint(0, vocab, seqs.shape, generator=generator), seqs)
    return seqs[:, :-1], seqs[:, 1:]


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=64)
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    moe_kwargs = dict(d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                      capacity_factor=args.capacity_factor, aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    model = TinyMoELM(args.vocab, args.d_model, args.layers, 4, moe_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"TinyMoELM: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{args.layers} MoE layers of {args.experts} experts (top-{args.top_k})")
    t0 = time.time()
    first = last = None
    for step in range(1, args.steps + 1):
        inputs, targets = make_batch(args.batch, args.seq, args.vocab, gen)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()  # the MoE aux losses ride along: no change to the loss
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
        if step == 1 or step % 50 == 0 or step == args.steps:
            moe = model.blocks[0].moe
            stats = moe.routing_stats
            print(f"step {step:4d}  loss {last:.3f}  lb-loss {float(moe.aux_losses['load_balancing']):.3f}  "
                  f"max/mean load {stats.max_over_mean:.2f}  dropped {stats.dropped_fraction:.1%}  "
                  f"({time.time() - t0:.1f}s)")
    print(f"loss fell from {first:.3f} to {last:.3f}")
    return last


if __name__ == "__main__":
    main()
