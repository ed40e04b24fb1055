"""How a node answers a batch: one wire result per operation's outcome.

Both batch routes (C{/replica/batch} and a move's C{/replica/stream}) answer
through L{batch_results}, so a sender reads their answers alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardkv.core.records import Record
from shardkv.errors import ShardkvError
from shardkv.node.store import Outcome, PutOutcome
from shardkv.replica import codec
from shardkv.web.errors import status_for


def batch_results(outcomes: Sequence[Outcome]) -> list[codec.Result]:
    """The wire results, leaving out values once the response would pass
    L{codec.MAX_INLINE_TOTAL} (the proxy then fetches those keys alone)."""
    inline_left = codec.MAX_INLINE_TOTAL
    results = []
    for outcome in outcomes:
        if isinstance(outcome, ShardkvError):
            status = status_for(outcome)
            results.append(codec.Result(status, error=outcome.code, message=outcome.message))
        elif isinstance(outcome, Record):
            if not codec.fits(outcome) or len(outcome.value) > inline_left:
                results.append(codec.Result(200, inline=False))
            else:
                inline_left -= len(outcome.value)
                results.append(codec.Result(200, record=outcome))
        elif isinstance(outcome, PutOutcome):
            results.append(
                codec.Result(200, applied=outcome.applied, held=outcome.held, live=outcome.live)
            )
        else:
            results.append(codec.Result(200, applied=outcome))
    return results
