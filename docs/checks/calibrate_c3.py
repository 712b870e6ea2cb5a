"""C3 design calibration (PREREG v2 §5): KL(clean || steered) of RANDOM unit directions in SmolLM2-135M-Instruct at
blocks.17.hook_resid_pre, by alpha (x the median activation norm). Uses no SAE. Contexts: 8 validation windows."""
import json, sys, time, torch
torch.set_num_threads(1)
from gsae.config import load_profile
from gsae import stages, steering
from gsae.stages.steer import random_directions
p = load_profile("default")
t0 = time.time()
lm = stages.load_lm(p, progress=False)
ctx = stages.run("contexts", p, lm)["val"].tokens
gen = torch.Generator().manual_seed(0)
tok = ctx[torch.randperm(len(ctx), generator=gen)[:8]]
with torch.no_grad():
    x = lm.model(tok, stop_at_layer=17)[:, 1:-1].reshape(-1, lm.model.cfg.d_model)
med = float(x.norm(dim=-1).median())
dirs = random_directions(16, lm.model.cfg.d_model)
alphas = [0.05, 0.1, 0.25, 0.5, 1.0]
r = steering.steer(lm.model, dirs, tok[:2], p.model.hook_name, [a * med for a in alphas], first=1, progress=False)
out = {"median_norm_val_8ctx": med, "alphas_rel": alphas, "mean_kl_random": r.kl.mean(0).tolist(),
       "median_kl_random": r.kl.median(0).values.tolist(), "seconds": time.time() - t0}
print(json.dumps(out))
