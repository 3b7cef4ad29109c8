"""Keep or offload the visual input: a drafter with a visual prefix for short visual sequences,
the visual-token-free drafter for long ones (Sparrow's observation, CoVSpec's routing).

    >>> keep = SpecRunner.for_drafter_folder(model, processor, "checkpoints/toy-video-drafter-pool3")
    >>> offload = SpecRunner.for_drafter_folder(model, processor, "checkpoints/toy-video-drafter")
    >>> auto = AutoVisualPolicy(keep, offload, threshold=sweep_threshold)   # from the sweep
    >>> result = auto.generate(Media(video=frames), "Describe the video.", 64, settings)
    >>> auto.choices                      # Counter({"keep": 3, "offload": 5})
    >>> auto = AutoVisualPolicy(keep, offload, threshold, depths=[(700, 6), (None, 8)])
    >>> auto.depth_choices                # Counter({6: 3, 8: 5}): depth tied to the clip length

The prompt goes through the processor once; its visual token count picks the runner, which
then decodes from those same inputs. The threshold is a measurement (`sweep.threshold_from`
over a length sweep of the two drafters on this target and machine), not a constant: where
offloading starts to pay depends on the drafter's per-step cost against the target's. So is
the optional depth table (`sweep.depth_table_from`): a longer clip makes each target forward
dearer, so a deeper draft can pay there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from covspec.inference.media import Encoded, as_media
from covspec.inference.roles import now
from covspec.inference.timeline import GenerationResult
from covspec.inference.tree import DraftSettings


def keeps(visual_tokens: float, threshold: int | None) -> bool:
    """Whether a prompt of that many visual tokens keeps its visual prefix (None: always)."""
    return threshold is None or visual_tokens <= threshold


class AutoVisualPolicy:
    def __init__(
        self, keep, offload, threshold: int | None, depths: list[tuple] | None = None
    ) -> None:
        """keep / offload: SpecRunners on one target; threshold: visual tokens above which
        the prompt is offloaded (None: always keep); depths: [(visual tokens up to, tree
        depth), ...] in increasing order, the last bound None (the settings' depth without)."""
        if keep.model is not offload.model:
            raise ValueError("keep and offload runners must share one loaded target")
        if threshold is not None and threshold < 0:
            raise ValueError(f"threshold must be >= 0 visual tokens or None, got {threshold}")
        if depths is not None:
            bounds = [b for b, _ in depths[:-1]]
            if (
                not depths
                or depths[-1][0] is not None
                or None in bounds
                or bounds != sorted(bounds)
                or min(d for _, d in depths) < 1
            ):
                raise ValueError(
                    f"depths must be [(tokens up to, depth >= 1), ..., (None, depth)] with "
                    f"increasing bounds, got {depths}"
                )
        self.keep, self.offload, self.threshold, self.depths = keep, offload, threshold, depths
        self.choices: Counter[str] = Counter()
        self.depth_choices: Counter[int] = Counter()

    def choose_depth(self, visual_tokens: int, default: int) -> int:
        if self.depths is None:
            return default
        return next(d for bound, d in self.depths if bound is None or visual_tokens <= bound)

    def choose(self, visual_tokens: int) -> str:
        return "keep" if keeps(visual_tokens, self.threshold) else "offload"

    @torch.inference_mode()
    def generate(
        self, image, prompt: str, max_new_tokens: int, settings: DraftSettings
    ) -> GenerationResult:
        start = now(self.keep.device)
        media = as_media(image)
        inputs = self.keep.encode(media, prompt)
        ids = inputs["input_ids"][0]
        visual = int(torch.isin(ids, self.keep.visual_ids.to(ids.device)).sum())
        choice = self.choose(visual)
        self.choices[choice] += 1
        encode_s = now(self.keep.device) - start
        depth = self.choose_depth(visual, settings.depth)
        self.depth_choices[depth] += 1
        runner = self.keep if choice == "keep" else self.offload
        settings = replace(settings, depth=depth)
        result = runner.generate(Encoded(media, inputs), prompt, max_new_tokens, settings)
        result.seconds["encode"] = result.seconds.get("encode", 0.0) + encode_s
        return result
