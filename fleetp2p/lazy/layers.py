"""Which blobs are lazily readable layers, learned from the manifests the agent serves.

Only a verified manifest can vouch for a layer's TOC digest, so this is the
one place lazy plans come from; a blob no manifest described is never read
lazily.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from fleetp2p.lazy.detect import LayerPlan, detect
from fleetp2p.lazy.toc import LazyFormatError

log = logging.getLogger(__name__)

MAX_LAYERS = 100_000


class LazyLayers:
    def __init__(self) -> None:
        self._plans: OrderedDict[str, tuple[LayerPlan, int]] = OrderedDict()

    def plan(self, digest: str) -> tuple[LayerPlan, int] | None:
        """The plan and the size the manifest gives for the layer."""
        return self._plans.get(digest)

    def __len__(self) -> int:
        return len(self._plans)

    def learn(self, document: Any) -> int:
        """Record the lazy layers of an image manifest; returns how many are new."""
        if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
            return 0
        new = 0
        for layer in document["layers"]:
            if not isinstance(layer, dict) or not isinstance(layer.get("digest"), str):
                continue
            annotations = layer.get("annotations")
            size = layer.get("size") if isinstance(layer.get("size"), int) else None
            try:
                plan = detect(str(layer.get("mediaType", "")),
                              annotations if isinstance(annotations, dict) else None, size)
            except LazyFormatError as e:
                log.info("layer %s will be pulled whole: %s", layer["digest"], e)
                continue
            if plan is None or size is None:
                continue
            if layer["digest"] not in self._plans:
                new += 1
            self._plans[layer["digest"]] = (plan, size)
            self._plans.move_to_end(layer["digest"])
        while len(self._plans) > MAX_LAYERS:
            self._plans.popitem(last=False)
        return new
