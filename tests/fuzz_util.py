"""The hypothesis strategy the fuzz tests share: valid messages of a protocol with a few bytes
changed, cut short and followed by random bytes (what a buggy or hostile peer sends)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st


def mutations(valid: Sequence[bytes], *, changes: int = 6,
              tail: int = 20) -> st.SearchStrategy[bytes]:
    """One of ``valid`` with up to ``changes`` bytes set to random values, cut at a random
    length and followed by up to ``tail`` random bytes."""

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        base = bytearray(draw(st.sampled_from(list(valid))))
        for _ in range(draw(st.integers(0, changes))):
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
        return bytes(base[:draw(st.integers(0, len(base)))]) + draw(st.binary(max_size=tail))

    return mutated()
