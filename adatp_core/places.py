"""Where a run's three large things live, decided once, by one function (issue 30).

- the encoded visual rows and Qwen3-VL's DeepStack rows [N, D] (``Places.encoded``): written chunk by
  chunk as they are encoded (models/base.join_encoded), read a prefill call's span at a time;
- layer K's input rows [L, D] (``Places.rows``): written call by call by the prefill of layers < K,
  only the kept ones read back by the continuation from K;
- layers >= K's keys and values while answering (``Places.kv``): homed on the host, staged on the
  device STAGED_LAYERS layers at a time (hf/cache.StagedCopies).

Each is "auto" (``plan_places`` decides), "device" or "host" (honoured as asked, on every device:
the host's path over the same memory on a CPU model), validated by ``check_place`` at the boundary
(PipelineConfig, extract_attention, generate_answer, the CLI). A model split over devices keeps all
three on the device (each layer's with it).

``plan_places`` weighs an estimate of the run (budget.run_memory before any work; at the answer,
budget.continuation_parts of what the answer allocates) against the device's free memory, and takes
the first of these that fits, moving the auto ones cumulatively, cheapest first:
1. everything on the device;
2. the encoded rows on the host: copied once to the host as encoded (overlapping the vision tower) and
   once back a prefill call's span at a time: two passes over N x D x (1 + DeepStack) bytes per video,
   none per token, and a prefix kept for the next question keeps them there;
3. layer K's input rows on the host too: once L x D bytes down as the prefill writes them, and only the
   kept rows (R x N x D) back: per video, none per token;
4. layers >= K's keys and values on the host too: every decode step copies every such layer's filled
   part to the device (at 30 minutes of Qwen3-VL-8B about 8 GB a token), and static decoding gives way
   to default steps. The costliest by far, so the last resort. (The review that asked for this planner
   proposed keys and values before layer K's rows; the rows cost bytes once per video, the keys and
   values bytes at every token, so the rows go first.)
When none fits, the last that fits the host is taken (the check before decoding then refuses it with
its estimate; a run with no check goes on and may run out, and an answer that ran out with its keys and
values on the device by auto's choice answers again with them on the host: ``Place.auto``).
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .budget import DEVICE_MEMORY_SHARE, HOST_MEMORY_SHARE, MemoryEstimate, size_text
from .errors import AdaTPInputError

PLACES = ("auto", "device", "host")
# What each placement moves, in the order auto moves them to the host (the module's docstring says why).
MOVES = ("encoded", "rows", "kv")
WHAT = {"encoded": "the encoded visual rows (and DeepStack's)", "rows": "layer K's input rows",
        "kv": "layers >= K's keys and values"}
ASKED = "asked for"
MODEL_ON_HOST = "the model runs on the host"
MODEL_SPLIT = "the model is split over devices: its rows and keys and values stay with its layers"
FREE_UNKNOWN = "the device's free memory is unknown"
KEPT_WITH_PREFIX = "kept with the video's prefix"  # a question over a kept prefix: its rows stay where they are


def check_place(name: str, place) -> str:
    """A place (``PLACES``) for ``name`` ("rows", "encoded", "kv"), else AdaTPInputError naming it."""
    if place not in PLACES:
        raise AdaTPInputError(f"{name} must be one of {PLACES}, got {place!r}")
    return place


@dataclass(frozen=True)
class Place:
    """Where one of them lives. host: on the host (the host's path: pinned buffers, staged copies);
    reason: why, for the stats; auto: auto chose it by weighing the estimate against the device's free
    memory (not asked for, and not set by where the model is): only such a choice is revisited when the
    device runs out anyway."""

    host: bool
    reason: str
    auto: bool = False

    @property
    def device(self):
        """Where its tensors are written: the host's (torch.device("cpu")), or None for the model's own."""
        import torch  # lazy: this module stays torch-free at import

        return torch.device("cpu") if self.host else None


@dataclass(frozen=True)
class Places:
    """The three placements of one run. kv None: decided when the answer starts (``plan_places`` over
    budget.continuation_parts), where no check knew the kept tokens (the nodes, the IMAGE path)."""

    encoded: Place
    rows: Place
    kv: Place | None = None
    # Device bytes of the model's kept video prefixes that this plan counted as free (fits.run_places): a
    # question over a kept prefix allocates none of it again; a run that misses drops them before it
    # allocates (attention._prefill_with_prefix). 0: the plan fitted without them.
    kept: int = 0

    def on_host(self) -> frozenset:
        return frozenset(name for name in MOVES if getattr(self, name) is not None and getattr(self, name).host)


Estimate = Callable[[frozenset], MemoryEstimate]


def plan_places(estimate: Estimate, where: str, free: int | None, *, split: bool = False, host_free: int | None = None,
                encoded: str | Place = "auto", rows: str | Place = "auto", kv: str | Place = "auto",
                what: str = "the run") -> Places:
    """The placements of a run on ``where`` (the model's device, "host" for a CPU model).

    estimate(on_host) -> budget.MemoryEstimate of the run with the names in ``on_host`` (of MOVES) on the
    host; free: the device's free bytes now (None: unknown); host_free: the host's (None: not checked).
    encoded, rows, kv: "auto", "device", "host", or a Place already decided (kept as it is). what: the
    estimate's subject in the reasons ("the run", "the continuation from K")."""
    asked = {"encoded": encoded, "rows": rows, "kv": kv}
    decided: dict[str, Place] = {}
    for name, value in asked.items():
        if isinstance(value, Place):
            decided[name] = value
            continue
        check_place(name, value)
        if split:
            decided[name] = Place(False, MODEL_SPLIT)
        elif value != "auto":
            decided[name] = Place(value == "host", ASKED)
        elif where == "host":
            decided[name] = Place(False, MODEL_ON_HOST)
        elif free is None:
            decided[name] = Place(False, FREE_UNKNOWN)
    auto = [name for name in MOVES if name not in decided]
    if not auto:
        return Places(**decided)
    base = frozenset(name for name, p in decided.items() if p.host)
    candidates = [base | frozenset(auto[:i]) for i in range(len(auto) + 1)]
    limit = int(free * DEVICE_MEMORY_SHARE)
    host_limit = None if host_free is None else int(host_free * HOST_MEMORY_SHARE)
    needs = [(est.bytes_on(where), est.bytes_on("host")) for est in map(estimate, candidates)]
    host_fits = [host_limit is None or host <= host_limit for _, host in needs]
    fitting = [i for i, (device, _) in enumerate(needs) if device <= limit and host_fits[i]]
    if fitting:
        chosen = fitting[0]
    else:
        chosen = max((i for i in range(len(candidates)) if host_fits[i]), default=0)
    device_need = needs[chosen][0]
    if chosen == 0:
        reason = f"{what} needs about {size_text(device_need)} of the {size_text(free)} free on the device"
        if not fitting:
            reason += (f"; the host has not room for what would move there ({size_text(needs[-1][1])} against "
                       f"{size_text(host_free)} free), so they stay on the device, which may run out")
    else:
        moved = [name for name in auto if name in candidates[chosen]]
        moved_bytes = needs[0][0] - device_need
        reason = (f"the device is short: {what} needs about {size_text(needs[0][0])} of the {size_text(free)} free "
                  f"on the device with them there; " + " and ".join(WHAT[n] for n in moved)
                  + f" wait on the host ({size_text(moved_bytes)} less on the device)")
        if not fitting:
            reason += (f"; the rest may still not fit: about {size_text(device_need)} (a smaller prefill_chunk "
                       "takes less)")
    for name in auto:
        decided[name] = Place(name in candidates[chosen], reason, auto=True)
    return Places(**decided)


def place_stats(name: str, place: Place, on: str) -> dict:
    """The stats of one placement: ``{name}_on`` (where it is: "host" or the device's name),
    ``{name}_reason``, and ``{name}_moved`` (whether it took the host's path: the device was short or
    ran out, or the host was asked for; not where the model runs there anyway)."""
    return {f"{name}_on": on, f"{name}_reason": place.reason, f"{name}_moved": place.host}
