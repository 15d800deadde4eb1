"""Invert a picture and edit it, on the bundled shapes model (a few seconds on a CPU).

    pip install ./crates/nulltext-py
    python crates/nulltext-py/examples/edit.py      # from the repository root

With real weights, load e.g. "runwayml/stable-diffusion-v1-5" and use your own photo.
"""

import nulltext

# %% Load the model: a diffusers folder, a single .safetensors file or a cached repo id.
sd = nulltext.load("models/shapes")
print(sd)

# %% Invert the photo with its caption. "direct" needs no optimization; "null-text" is the
# paper's method (slower, the most faithful reconstruction).
photo = "models/shapes/examples/red-circle-on-blue.png"
inv = sd.invert(photo, "a red circle on a blue background", method="null-text")
inv.save("red-circle.nti.safetensors")
print(inv, f"{inv.report['unet_passes']} UNet passes")

# %% Which tokens belong to which word (what blend and reweight refer to).
for t in sd.tokens(inv.prompt):
    print(t.position, t.text, t.word)

# %% Edit: change the caption; everything the new words do not name stays.
res = sd.edit(
    inv,
    ["a green circle on a blue background", "a red square on a blue background"],
    self_replace=0.2,
)
for image, prompt in zip(res.images, res.prompts):
    name = prompt.replace(" ", "-") + ".png"
    image.save(name)
    print("wrote", name)

# %% How much of the background the colour edit kept (PSNR outside the shape's region).
region = "models/shapes/examples/red-circle-on-blue.region.png"
print(nulltext.eval(photo, res.images[1], mask=region, invert_mask=True))
