"""Segment names people can read: deterministic from the profile, or proposed by a chat model.

A deterministic name is made from each profile (`fallback_names`); a chat model may propose names
instead (`naming_messages`, `parse_segment_names`), and anything odd in its answer keeps the
deterministic ones.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recsys.segment_profiles import SegmentProfile

UNCATEGORIZED = "uncategorized"  # as sql/customer_features.sql names a product without category

NAME_MAX_LENGTH = 40
MIN_NAMING_CATEGORY_SHARE = 0.05  # a category under 5 % of a segment's spend never names it


def fallback_names(
    profiles: Sequence[SegmentProfile],
    global_medians: Mapping[str, float],
    global_category_shares: Mapping[str, float],
    has_categories: bool = True,
) -> dict[int, str]:
    """Deterministic names such as "Home Decor loyalists · high value", unique per run.

    Category: the one most over-represented in the segment's spend compared with everyone's
    (highest lift among categories with at least 5 % of the segment's spend). Persona from the
    medians against everyone's: "lapsed" (recency > 2x and >= 30 days), "loyalists"
    (frequency >= 1.5x), "newcomers" (one purchase day, recent), else "regulars". Value:
    monetary median >= 1.5x everyone's "high value", <= 1/1.5x "low value", else "mid value".
    A name two segments share names their second most distinctive category too ("Kitchen & Garden
    regulars · mid value"); one still shared gets the segment id appended.
    """
    def name(profile: SegmentProfile, categories: int) -> str:
        leads = _distinctive_categories(profile, global_category_shares)[:categories] if has_categories else []
        lead = " & ".join(leads) or f"Segment {profile.segment_id}"
        return f"{lead} {_persona(profile, global_medians)} · {_value_tier(profile, global_medians)}"

    names = {profile.segment_id: name(profile, 1) for profile in profiles}
    counts = Counter(names.values())
    # a name two segments share: say their second most distinctive category too
    names = {p.segment_id: (name(p, 2) if counts[names[p.segment_id]] > 1 else names[p.segment_id]) for p in profiles}
    counts = Counter(names.values())
    return {sid: (f"{name} #{sid}" if counts[name] > 1 else name) for sid, name in names.items()}


def _distinctive_categories(profile: SegmentProfile, global_shares: Mapping[str, float]) -> list[str]:
    """Categories with at least 5 % of the segment's spend, most over-represented first."""
    candidates = [
        (c, s) for c, s in profile.top_categories if s >= MIN_NAMING_CATEGORY_SHARE and c != UNCATEGORIZED
    ]
    lift = lambda item: item[1] / max(global_shares.get(item[0], 0.0), 1e-12)  # noqa: E731
    return [c for c, _ in sorted(candidates, key=lambda item: (-lift(item), -item[1], item[0]))]


def _persona(profile: SegmentProfile, medians: Mapping[str, float]) -> str:
    if profile.recency_days_median >= max(2 * medians["recency_days"], 30):
        return "lapsed"
    if profile.frequency_median >= 1.5 * medians["frequency"]:
        return "loyalists"
    if profile.frequency_median <= 1 and profile.recency_days_median <= medians["recency_days"]:
        return "newcomers"
    return "regulars"


def _value_tier(profile: SegmentProfile, medians: Mapping[str, float]) -> str:
    if profile.monetary_median >= 1.5 * medians["monetary"]:
        return "high value"
    if profile.monetary_median * 1.5 <= medians["monetary"]:
        return "low value"
    return "mid value"


def naming_messages(
    profiles: Sequence[SegmentProfile], product_names: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """Chat messages asking a model for one short name per segment, as a JSON object."""
    facts = [_naming_facts(profile, product_names or {}) for profile in profiles]
    example = json.dumps({str(profiles[0].segment_id): "Home decor loyalists"}) if profiles else "{}"
    system = (
        "You name customer segments for a retail marketing team. Reply with one JSON object and "
        "nothing else: each key is a segment id exactly as given (a string), each value a short, "
        f"distinct name of 2 to 5 words and at most {NAME_MAX_LENGTH} characters that says what "
        "the segment buys and how it behaves."
    )
    user = f"Segments:\n{json.dumps(facts, ensure_ascii=False)}\nReply like: {example}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _naming_facts(profile: SegmentProfile, product_names: Mapping[str, str]) -> dict:
    return {
        "segment_id": str(profile.segment_id),
        "share_of_customers": round(profile.share, 3),
        "median_days_since_last_purchase": profile.recency_days_median,
        "median_purchase_days": profile.frequency_median,
        "median_spend": profile.monetary_median,
        "top_categories": {c: round(s, 3) for c, s in profile.top_categories},
        "top_products": [product_names.get(pid, pid) for pid, _ in profile.top_products],
    }


_FENCED = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def parse_segment_names(answer: object, segment_ids: Iterable[int]) -> dict[int, str] | None:
    """The chat model's names as {segment id: name}, or None if the answer is not exactly that.

    Accepted: one JSON object (as text, optionally inside a ``` fence, or already parsed, as a
    chat client's JSON mode returns it) whose keys are exactly the given ids as strings and whose
    values are printable, distinct names of 1..NAME_MAX_LENGTH characters (inner whitespace
    collapsed). Anything else returns None: the caller keeps the fallback names and dead-letters
    the answer.
    """
    if isinstance(answer, dict):
        parsed = answer
    elif isinstance(answer, str):
        text = answer.strip()
        fenced = _FENCED.match(text)
        try:
            parsed = json.loads(fenced.group(1) if fenced else text)
        except ValueError:
            return None
    else:
        return None
    expected = {str(int(i)) for i in segment_ids}
    if not isinstance(parsed, dict) or set(parsed) != expected:
        return None
    names = {}
    for key, value in parsed.items():
        name = " ".join(value.split()) if isinstance(value, str) else ""
        if not 0 < len(name) <= NAME_MAX_LENGTH or not name.isprintable():
            return None
        names[int(key)] = name
    if len({name.casefold() for name in names.values()}) != len(names):
        return None
    return names
