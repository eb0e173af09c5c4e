"""Copy the arrays the tests use out of the Free-Prompt-Editing parity fixture (../shared/parity-fpe), once.

Run from the repository root with the fixture beside it: `python tests/data/parity_fpe/make_subset.py`. The input is
stored as uint8 because the fixture's preprocessed image is exactly `uint8 / 127.5 - 1` (checked here); of the
per-step model inputs only the target's are kept, since the source's are the inversion latents (checked here too), and
of the decoded images only the edit.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/parity-fpe")
target = Path(__file__).parent
arrays = load_file(source / "fpe_visible_short.safetensors")
num_steps = arrays["noise_pred_per_step"].shape[0]

image = arrays["source_image"]
as_uint8 = ((image + 1) * 127.5).round().to(torch.uint8)
assert torch.equal(as_uint8.float() / 127.5 - 1, image), "source_image is not uint8 / 127.5 - 1"
inputs = arrays["model_input_latents_per_step"]
for i in range(num_steps):
    assert torch.equal(inputs[i, 0], arrays["inversion_latents"][num_steps - i]), f"source input {i} is not forced"
subset = {
    "source_image_uint8": as_uint8,
    "inversion_latents": arrays["inversion_latents"],
    "inversion_noise_pred_per_step": arrays["inversion_noise_pred_per_step"],
    "target_input_latents_per_step": inputs[:, 1],
    "noise_pred_per_step": arrays["noise_pred_per_step"],
    "final_latents": arrays["final_latents"],
    "target_image": arrays["images"][1],
}
save_file({k: v.contiguous() for k, v in subset.items()}, target / "fpe_visible_short_subset.safetensors")
shutil.copyfile(source / "fpe_visible_short.json", target / "fpe_visible_short.json")
size = sum(p.stat().st_size for p in target.glob("fpe_visible_short*")) / 2**20
print(f"wrote {target} ({size:.1f} MiB)")
