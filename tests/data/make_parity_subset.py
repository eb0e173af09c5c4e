"""Copy the arrays the tests use out of the parity fixture (../shared/parity), once, into tests/data/parity.

Run from the repository root with the fixture beside it: `python tests/data/make_parity_subset.py`. The inputs are
stored as uint8 because the fixture's preprocessed images are exactly `uint8 / 127.5 - 1` (checked here).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SKIP_STEPS = 6  # the visible case: num_timesteps=20, skip_steps=6

source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/parity") / "visible_short.safetensors"
target = Path(__file__).parent / "parity" / "visible_short_subset.safetensors"
arrays = load_file(source)
subset = {}
for name in ("app", "struct"):
    image = arrays[f"{name}_image"]
    as_uint8 = ((image + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(as_uint8.float() / 127.5 - 1, image), f"{name}_image is not uint8 / 127.5 - 1"
    subset[f"{name}_image_uint8"] = as_uint8
    subset[f"{name}_latents"] = arrays[f"{name}_xts"][SKIP_STEPS : SKIP_STEPS + 1].clone()
    subset[f"{name}_noise"] = arrays[f"{name}_zs"][None, SKIP_STEPS:].clone()
subset["final_latents"] = arrays["final_latents"]
subset["out_latents_per_step"] = arrays["out_latents_per_step"]
save_file({k: v.contiguous() for k, v in subset.items()}, target, metadata={"source": "visible_short.safetensors"})
print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
