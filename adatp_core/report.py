"""Human-readable figures from a state's or an answer's stats dict."""

from __future__ import annotations

TIMINGS = (
    ("decode video", "time_video_decode"), ("preprocess", "time_preprocess"), ("vision", "time_vision"),
    ("layers<K + scores", "time_attention"), ("selection", "time_selection"),
    ("prefill from K", "time_prefill_continue"), ("TTFT", "time_to_first_token"),
)


def tokens_line(s: dict) -> str:
    total, kept = s["tokens_total"], s["tokens_kept"]
    line = (f"Tokens kept: {kept} of {total} visual tokens ({100 * kept / total:.1f}%), "
            f"{s.get('segments', 1)} segment(s), K={s['layer']}")
    if "score_layer" in s:
        line += f", scores from {s['score_layer']}"
    return line


def layer_line(s: dict) -> str:
    """Why K is not the K asked for (hybrid models), and the Ks this model takes."""
    return f"Layer: {s['layer_moved']}. Valid K here: {s['layers_valid']}."


def flops_line(s: dict) -> str:
    return (f"FLOPs: {100 * s['flops_ratio']:.1f}% of vanilla (FastVID convention: "
            f"{s['flops_video_llm_T']:.4g} T of {s['flops_video_llm_vanilla_T']:.4g} T); whole prefill with "
            f"vision: {100 * s['flops_total_ratio']:.1f}% ({s['flops_total_T']:.4g} T of "
            f"{s['flops_total_vanilla_T']:.4g} T)")


def timings_line(s: dict) -> str:
    return "Timings (s): " + " | ".join(f"{label} {s[key]:.3f}" for label, key in TIMINGS if key in s)


def generation_line(s: dict) -> str:
    from .timing import DecodeStats  # torch: video.py imports this module in torch-free decode workers

    return DecodeStats.from_dict(s).text()


def video_line(s: dict) -> str:
    times = ("frame times assumed at 24 fps (connect Load Video's video_info)" if s["frame_times_assumed"]
             else "frame times from the video")
    step = f" (temporal patches of {s['frames_per_step']})" if s.get("frames_per_step", 1) > 1 else ""
    budget = f" (pixel budget: {s['pixel_budget']})" if s.get("pixel_budget") else ""
    return (f"Video: {s['frames']} frames at {s['frame_size']}{budget}, {s['tokens_per_frame']:g} tokens per frame"
            f"{step}; {times}{own_line(s)}")


def own_line(s: dict, names: int = 3) -> str:
    """How many frames decoded at their own times, and which came from elsewhere (Load Video's
    video_info; nothing when unknown)."""
    if "frames_own_time" not in s:
        return ""
    own, total, other = s["frames_own_time"], s["frames"], s.get("frames_substituted") or []
    if not other:
        return f"; all {total} decoded at their own times"
    return (f"; DAMAGED CLIP: {own} of {total} decoded at their own times, {len(other)} from elsewhere: "
            f"{substituted_text(other, names)}")


def substituted_text(other, names: int = 3) -> str:
    """other: (index, time wanted, time of the frame given) of frames that came from elsewhere."""
    items = [f"#{k + 1} (wanted {want:.2f}s) is the frame at {given:.2f}s" for k, want, given in other[:names]]
    return ", ".join(items) + (f" and {len(other) - names} more" if len(other) > names else "")


def prefix_line(s: dict) -> str:
    """Whether the video's prefix (vision and layers < K before the question) came from the cache."""
    status = s["prefix_cache"]
    if status == "hit":
        head = "reused from an earlier question (no vision, layers < K over the question only)"
    elif status.startswith("miss"):
        head = "computed and " + ("kept for the next question" if status == "miss" else status[6:-1])
    else:
        head = status
    line = f"Video prefix: {head}"
    if "time_question" in s:
        line += f"; the question's own part {s['time_question']:.3f} s, hashing the frames {s['time_prefix_key']:.3f} s"
    return line


def _moved_to_host(s: dict, what: str) -> bool:
    """Whether ``what`` (rows, encoded, kv) took the host's path (places.place_stats' ``{what}_moved``:
    the device was short or ran out, or the host was asked for; not where the model runs there anyway)."""
    return bool(s.get(f"{what}_moved"))


def prefill_line(s: dict) -> str | None:
    """How the prefill ran when the video's part took more than one call, or the rows (layer K's input,
    or the encoded video's) or layers >= K's keys and values waited on the host (None otherwise: two
    calls are the prefix store's prefix and question)."""
    calls, rows, encoded = s.get("prefill_calls", 0), _moved_to_host(s, "rows"), _moved_to_host(s, "encoded")
    kv = _moved_to_host(s, "kv")
    if calls <= 2 and not rows and not encoded and not kv:
        return None
    parts = []
    if calls > 2:
        parts.append(f"layers < K in {calls} calls (the video's part in chunks of up to {s['prefill_chunk']} "
                     "tokens, then the question), the kept tokens from K in chunks of the same size")
    if encoded:
        parts.append(f"the encoded visual rows on the host ({s['encoded_reason']})")
    if rows:
        parts.append(f"layer K's input rows on the host ({s['rows_reason']})")
    if kv:
        parts.append(f"layers >= K's keys and values on the host, two layers staged on the device at a time "
                     f"({s['kv_reason']})")
    return "Prefill: " + "; ".join(parts)


MEMORY_STAGES = ("encode", "decode", "prefill", "answer")


def memory_line(s: dict) -> str:
    """Peak memory, measured, by stage ("where it went"), and what was planned before the run."""
    places = [key[len("memory_peak_"):-len("_mb")] for key in s
              if key.startswith("memory_peak_") and key.endswith("_mb")
              and not any(key.startswith(f"memory_peak_{stage}_") for stage in MEMORY_STAGES)]
    parts = []
    for place in places:
        stages = ", ".join(f"{stage} {s[f'memory_peak_{stage}_{place}_mb']:.0f}" for stage in MEMORY_STAGES
                           if f"memory_peak_{stage}_{place}_mb" in s)
        planned = s.get(f"memory_planned_peak_{place}_mb")
        plan = f"; planned {planned:.0f}" if planned is not None else ""
        parts.append(f"{place} {s[f'memory_peak_{place}_mb']:.0f} MB ({stages}{plan})")
    streamed = " (frames streamed a chunk at a time)" if s.get("video_streamed") else ""
    return f"Peak memory{streamed}: " + "; ".join(parts)


def stats_text(s: dict) -> str:
    """Every line that the stats support, one per line (nodes' stats output)."""
    lines = [tokens_line(s), flops_line(s)]
    if "layer_moved" in s:
        lines.append(layer_line(s))
    for key, label in (("linear_kernels", "Linear-attention layers run"), ("thinking", "Thinking")):
        if key in s:
            lines.append(f"{label}: {s[key]}")
    if any(key in s for _, key in TIMINGS):
        lines.append(timings_line(s))
    if "new_tokens" in s:
        lines.append(generation_line(s))
    if "frame_size" in s:
        lines.append(video_line(s))
    lines += [f"Fallback: {s[key]}" for key in sorted(s) if key.startswith("fallback_")]
    if "prefix_cache" in s:
        lines.append(prefix_line(s))
    prefill = prefill_line(s)
    if prefill:
        lines.append(prefill)
    if "memory_peak_host_mb" in s:
        lines.append(memory_line(s))
    return "\n".join(lines)
