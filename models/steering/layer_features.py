"""Reference features at the decoder's finer layers, derived from the stored bottleneck features.

With zeroed skips every decoder layer is a function of the bottleneck, so a training image's features at "up1"
(14x14) or "up2" (28x28) are the decoder run from its stored bottleneck features: no training, no new extraction.
They are computed at first use and kept in memory, not stored. *Why:* on the shipped pair (5,000 images) storing
them would add 120 MiB (up1) and 239 MiB (up2) of float32 to a 61 MiB file that every stage loads, while deriving
them costs 7.6 s (up1) and 24.8 s (up1 and up2 together) of one core, once per process (BENCHMARKS.md, Layer hooks).

The features file says which layers it serves: ``metadata["hook_layers"]``, written at extraction (a student with
the teacher's skips serves the bottleneck only: its finer layers depend on the encoder's skips too). Files from
before layers existed serve every layer their zero-skip student can derive.
"""
from __future__ import annotations

import torch

from ..nets.layers import BOTTLENECK, LayerError, block_index

DERIVE_BATCH = 256


def served_layers(ref: dict, decoder) -> tuple[str, ...]:
    """The layers ``ref`` can serve hooks at with ``decoder`` (the student they were extracted with)."""
    recorded = (ref.get("metadata") or {}).get("hook_layers")
    if recorded is not None:
        return tuple(recorded)
    return tuple(decoder.hook_layers) if decoder is not None and decoder.skips == "zero" else (BOTTLENECK,)


def require_layer(ref: dict, decoder, layer: str) -> None:
    """One line when ``layer`` is not a layer of this decoder, or not one these reference features serve."""
    names = decoder.hook_layers if decoder is not None else (BOTTLENECK,)
    block_index(layer, names)
    served = served_layers(ref, decoder)
    if layer not in served:
        raise LayerError(f"these reference features serve hooks at {', '.join(served)} only, not {layer} (their "
                         "student keeps the teacher's skips, so its finer layers are not a function of the "
                         "bottleneck); hook at the bottleneck, or extract features of a --skips zero student")


@torch.inference_mode()
def derive_layer_features(decoder, features: torch.Tensor, layers: list[str], from_layer: str = BOTTLENECK
                          ) -> dict[str, torch.Tensor]:
    """Each of ``layers``' features for every row of ``features`` (at ``from_layer``, default the bottleneck), in
    one pass of the decoder up to the finest of them (float32, on the features' device)."""
    order = sorted(layers, key=lambda layer: block_index(layer, decoder.hook_layers))
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in order}
    for lo in range(0, len(features), DERIVE_BATCH):
        h, at = features[lo:lo + DERIVE_BATCH].float(), from_layer
        for layer in order:
            h, at = decoder.layer_features(h, layer, from_layer=at), layer
            parts[layer].append(h)
    return {layer: torch.cat(rows) for layer, rows in parts.items()}


class LayerFeatures:
    """Reference features by layer: the stored bottleneck as it is, finer layers derived at first use and cached
    (the cache's keys are the layers it holds), each from the finest layer already held before it."""

    def __init__(self, ref: dict, decoder, bottleneck: torch.Tensor):
        self.ref, self.decoder = ref, decoder
        self.cache: dict[str, torch.Tensor] = {BOTTLENECK: bottleneck}

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer == BOTTLENECK:
            return self.cache[BOTTLENECK]
        require_layer(self.ref, self.decoder, layer)
        if layer not in self.cache:
            coarser = self.decoder.hook_layers[:block_index(layer, self.decoder.hook_layers) + 1]
            start = max(i for i, name in enumerate(coarser) if name in self.cache)
            self.cache.update(derive_layer_features(self.decoder, self.cache[coarser[start]],
                                                    list(coarser[start + 1:]), from_layer=coarser[start]))
        return self.cache[layer]
