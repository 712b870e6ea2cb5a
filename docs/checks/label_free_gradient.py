"""Is there a label-free gradient that can stand in for the true-label one? Validation split only (first 50
contexts, 3,100 rows), default profile: needs this machine's default harvest and the primary k = 32 seed-0 g-SAE
under runs/default (``python -m gsae.pipeline train --profile default`` trains it).

1. Cosine with the true-label gradient g of: the argmax g_free (CE against the model's own argmax), and the mean of
   S gradients against next tokens sampled from the model (S = 1, 4, 16; ``harvest.label_free: sampled``), with
   E||g_free||^2 / E||g||^2. E_y~p[grad CE(y)] = 0, so the sampled mean shrinks as S grows.
2. The share of the 32 selected latents the true gradient changes, at the g-SAE's own weights, for beta from 0.1 to
   10; and of the latents it brings in, the share a label-free rule also brings in ("recall"), beside two controls
   that carry no information about the label (a random Gaussian vector; another row's true gradient).

    PYTHONPATH=. python docs/checks/label_free_gradient.py > docs/checks/label_free_gradient.txt
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

import gsae.harvest as H
from gsae.config import load_profile
from gsae.sae import changed_count
from gsae.specs import load_trained
from gsae.stages._lm import load_lm
from gsae.stages.contexts import contexts
from gsae.stages.harvest import reader
from gsae.stages.selection import all_specs

N_CONTEXTS = 50


def main() -> None:
    torch.set_num_threads(2)
    p = load_profile("default")
    lm = load_lm(p, progress=False)
    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)["val"].tokens[:N_CONTEXTS]
    rows = reader(p, "val", mh).load_all(max_tokens=N_CONTEXTS * (ctx.shape[1] - 2))
    x, g = rows.x, rows.g
    d = x.shape[1]
    c_g = reader(p, "train", mh).manifest["grad_stats"]["grad_scale"]
    print(f"validation rows: {len(x)} (first {N_CONTEXTS} contexts); grad_scale c = {c_g:.3f}\n")

    print("1. cosine of g_free with the true-label g")
    free = {}
    for name, cfg in {"argmax": p.harvest,
                      **{f"sampled, S = {s}": dataclasses.replace(p.harvest, label_free="sampled",
                                                                  label_free_samples=s) for s in (1, 4, 16)}}.items():
        t0, fs = time.time(), []
        for b0 in range(0, N_CONTEXTS, 8):
            cap = H.capture_label_free(lm.model, ctx[b0:b0 + 8], p.model.hook_name, cfg, first_context=b0)
            fs.append(cap.g_free[:, 1:-1].reshape(-1, d))
        f = torch.cat(fs).double()
        free[name] = f.float()
        cos = F.cosine_similarity(f, g.double(), dim=-1)
        ratio = f.pow(2).sum(1).mean() / g.double().pow(2).sum(1).mean()
        print(f"  {name:16s} median {cos.median():+.3f}  mean {cos.mean():+.3f}  quartiles [{cos.quantile(.25):+.3f}, "
              f"{cos.quantile(.75):+.3f}]  E|g_free|^2/E|g|^2 {ratio:.3f}  ({time.time() - t0:.0f} s)")

    spec = next(s for s in all_specs(p, lm) if s.group == "primary" and s.arm == "gsae" and s.k == 32 and s.seed == 0)
    sae = load_trained(p, spec, mh)
    W = sae.W_dec.detach()
    gen = torch.Generator().manual_seed(0)
    attributions = {
        "argmax g_free": (c_g * free["argmax"] @ W.T).abs(),
        "sampled mean, S = 4": (free["sampled, S = 4"] @ W.T).abs()
        * (d / free["sampled, S = 4"].double().pow(2).sum(1).mean()).sqrt().item(),
        "control: random Gaussian": (torch.randn(x.shape, generator=gen) @ W.T).abs(),
        "control: another row's g": (c_g * g[torch.randperm(len(g), generator=gen)] @ W.T).abs()}

    def select(attr, beta: float) -> torch.Tensor:
        with torch.no_grad():
            z = ((x - sae.b_dec) @ sae.W_enc).add_(sae.b_enc)
            return (z + beta * z * attr).topk(sae.cfg.k, dim=-1).indices

    plain = select(0, 0.0)
    print(f"\n2. selection of the trained g-SAE {spec.name} (trained at beta = {sae.cfg.beta:g}), k = {sae.cfg.k}")
    with torch.no_grad():
        true_attr = (c_g * g @ W.T).abs()
        for beta in (0.1, 0.3, 1.0, 3.0, 10.0):
            true_sel = select(true_attr, beta)
            brought_in = ~(true_sel[:, :, None] == plain[:, None, :]).any(-1)
            share = float(changed_count(true_sel, plain).sum()) / true_sel.numel()
            cells = []
            for name, attr in attributions.items():
                s2 = select(attr, beta)
                recall = int(((true_sel[:, :, None] == s2[:, None, :]).any(-1) & brought_in).sum())
                cells.append(f"{name} {recall / max(int(brought_in.sum()), 1):.2f}")
            print(f"  beta {beta:>4g}: true g changes {100 * share:5.1f}% of the selection; recall: "
                  + ", ".join(cells))


if __name__ == "__main__":
    main()
