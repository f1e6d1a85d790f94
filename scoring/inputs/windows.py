"""Windows: the rows of the shard contract (docs/design.md "The shard contract").

`split_windows` cuts an `Encoded` record into rows of at most max_length tokens; a window after the first
repeats `n_context` tokens of the previous one as context that is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoring.inputs.encoding import Encoded


@dataclass(frozen=True)
class Window:
    window: int  # index within the record
    n_context: int  # leading tokens repeated from window - 1 (never targets); 0 for window 0
    input_ids: list[int]
    loss_mask: list[bool]
    label: list[str | None]
    char_start: list[int]
    char_end: list[int]


def window_slice(encoded: Encoded, index: int, n_context: int, start: int, end: int) -> Window:
    """Tokens [start, end) as window `index`, whose first `n_context` tokens are repeated context (never targets)."""
    mask = [False] * n_context + encoded.loss_mask[start + n_context : end]
    return Window(
        window=index,
        n_context=n_context,
        input_ids=encoded.input_ids[start:end],
        loss_mask=mask,
        label=encoded.label[start:end],
        char_start=encoded.char_start[start:end],
        char_end=encoded.char_end[start:end],
    )


def split_windows(encoded: Encoded, *, max_length: int, n_context: int, long_docs: str = "window") -> tuple[list[Window], int]:
    """Split a record into rows of at most `max_length` tokens; returns (windows, truncated_tokens).

    "window": window 0 is tokens [0, L); window k > 0 starts `n_context` tokens before the end of window
    k - 1 and repeats them with loss_mask False, so every target is a target in exactly one window and
    window k covers [e_{k-1} - n_context, min(e_{k-1} - n_context + L, T)). Windows without targets are
    kept (their statistics are still computed). "truncate": one window of the first L tokens; the count of
    dropped tokens is returned. Position 0 of a window is never a target.
    """
    if max_length < 2:
        raise ValueError(f"--max-length {max_length}: must be at least 2 tokens.")
    if not 1 <= n_context < max_length:
        raise ValueError(f"--context {n_context}: must be in [1, max_length) = [1, {max_length}).")
    if long_docs not in ("window", "truncate"):
        raise ValueError(f"--long-docs {long_docs!r}: choose window or truncate.")
    n_tokens = len(encoded.input_ids)
    if long_docs == "truncate" or n_tokens <= max_length:
        return [window_slice(encoded, 0, 0, 0, min(n_tokens, max_length))], max(0, n_tokens - max_length)
    windows, end = [window_slice(encoded, 0, 0, 0, max_length)], max_length
    while end < n_tokens:
        start = end - n_context
        end = min(start + max_length, n_tokens)
        windows.append(window_slice(encoded, len(windows), n_context, start, end))
    return windows, 0
