# %% [markdown]
# # Benchmark a network of your own with certbench
#
# A notebook as a plain script: open it in Jupyter or VS Code (cells are marked `# %%`), or
# run it from the repository root with `python examples/byo-model/notebook.py`. It
#
# 1. trains a small CNN that certbench does not ship, for one epoch on digits;
# 2. benchmarks it with `bench.evaluate`, undefended and under randomized smoothing;
# 3. puts the rows beside the published digits board (the same columns);
# 4. saves its weights and writes the equivalent spec, which `certbench run` scores with the
#    same numbers.
#
# `BYO_OUT` (default `runs/byo-model`) is where it writes; `BYO_LIMIT` evaluates only the
# first N test images (the test suite uses it).

# %%
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import bench

sys.path.insert(0, "examples/byo-model/src")  # or: pip install -e examples/byo-model
from byo_model_example.nets import SmallCNN

OUT = Path(os.environ.get("BYO_OUT", "runs/byo-model"))
OUT.mkdir(parents=True, exist_ok=True)
LIMIT = int(os.environ["BYO_LIMIT"]) if os.environ.get("BYO_LIMIT") else None

# %% [markdown]
# ## 1. Train your network as you normally would
# certbench's loaders give `(N, C, H, W)` float tensors with pixels in [0, 1] and no
# normalisation; a model that wants normalisation does it inside its `forward`.

# %%
from bench.data import load_dataset  # noqa: E402

digits = load_dataset("digits")
torch.manual_seed(0)
net = SmallCNN()
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
order = torch.randperm(digits.x_train.shape[0])
net.train()
for start in range(0, order.numel(), 64):  # one epoch
    batch = order[start : start + 64]
    loss = nn.functional.cross_entropy(net(digits.x_train[batch]), digits.y_train[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
net.eval()

# %% [markdown]
# ## 2. Benchmark it: one call per defense
# The threat model below is the published digits ℓ2 board's (`configs/quick.toml`), so the
# rows line up with it. `randomized-smoothing` uses the network as its base classifier;
# nothing is trained inside `evaluate`.

# %%
THREAT = dict(
    dataset="digits",
    norms="l2",
    radii=[0.0, 0.1, 0.25, 0.5, 1.0],
    thresholds=[0.05, 0.1, 0.25],
    eps=[0.25, 0.5, 1.0],
    attacks={"name": "pgd", "params": {"steps": 10, "draws": 4}, "limit": 50},
    alpha=0.001,
    limit=LIMIT,
)
SMOOTHING = {"sigma": 0.25, "n0": 64, "n": 1000, "alpha": 0.001}

mine = pd.concat(
    [
        bench.evaluate(net, defense="undefended", **THREAT),
        bench.evaluate(net, defense="randomized-smoothing", params=SMOOTHING, **THREAT),
    ],
    ignore_index=True,
)
mine[["defense", "model", "accuracy", "guaranteed_accuracy@0.5", "accuracy_under_attack@0.5"]]

# %% [markdown]
# A defense that cannot take this network says so in one line: Wong–Kolter's bound needs an
# `nn.Sequential` of Linear/Conv2d/ReLU/Flatten layers.

# %%
try:
    bench.evaluate(net, defense="wong-kolter", **THREAT)
except bench.errors.ConfigError as exc:
    print(exc)

# %% [markdown]
# ## 3. Next to the published board

# %%
board = pd.read_csv("leaderboards/digits-l2.csv")
both = pd.concat([board, mine], ignore_index=True)
both = both.sort_values("robust_accuracy_upper", ascending=False, na_position="last")
print(both[["defense", "model", "accuracy", "robust_accuracy_upper", "n_test"]].to_string())

# %% [markdown]
# ## 4. The same rows from a spec and `certbench run`
# Save the weights (safetensors, or `torch.save(net.state_dict(), ...)`), name the class by
# import path and the weights with `checkpoint` (relative to the spec file). The rows are
# pretrained: never trained, identified by the weights' SHA-256.

# %%
from safetensors.torch import save_file  # noqa: E402

save_file(net.state_dict(), OUT / "small_cnn.safetensors")
limit_line = f"limit_test = {LIMIT}" if LIMIT else ""
spec = f"""
name = "byo"
seeds = [0]

[data]
dataset = "digits"
model = "byo_model_example.nets:SmallCNN"
{limit_line}

[eval]
alpha = 0.001

[threat]
norms = ["l2"]
radii = [0.0, 0.1, 0.25, 0.5, 1.0]
thresholds = [0.05, 0.1, 0.25]
eps = [0.25, 0.5, 1.0]

[attack]
name = "pgd"
params = {{ steps = 10, draws = 4 }}
limit = 50

[[defenses]]
name = "undefended"
checkpoint = "small_cnn.safetensors"

[[defenses]]
name = "randomized-smoothing"
checkpoint = "small_cnn.safetensors"
params = {{ sigma = 0.25, n0 = 64, n = 1000, alpha = 0.001 }}
"""
(OUT / "byo.toml").write_text(spec)

# %%
# In a shell (with examples/byo-model/src importable, e.g. after `pip install -e
# examples/byo-model`):
#   certbench run runs/byo-model/byo.toml --store runs/byo-model/byo.sqlite
#   certbench leaderboard publish --store runs/byo-model/byo.sqlite --out runs/byo-model/boards
from bench.cli import main  # noqa: E402

store = str(OUT / "byo.sqlite")
# --jobs 1: cells run in this process (worker processes would re-run this script, which
# has no `if __name__ == "__main__":` guard, as a notebook has none)
assert main(["run", str(OUT / "byo.toml"), "--store", store, "--quiet", "--jobs", "1"]) == 0
assert main(["leaderboard", "publish", "--store", store, "--out", str(OUT / "boards")]) == 0
ran = pd.read_csv(OUT / "boards" / "digits-l2.csv").set_index("defense")
numbers = [c for c in ran.columns if c == "accuracy" or "@" in c]
same = all(
    ran.loc[row["defense"], numbers].equals(row[numbers].rename(None).astype(float))
    for _, row in mine.iterrows()
)
print("certbench run gives the same numbers as bench.evaluate:", same)
assert same
