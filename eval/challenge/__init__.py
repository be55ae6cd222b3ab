"""The Backgrounds Challenge (Noise or Signal, Xiao et al. 2020): the worst case over backgrounds.

Every foreground (``original`` with its mask) is pasted onto every background
(``only_bg_t``) as ``bg * (1 - mask) + mask * fg``; it is *vulnerable* as soon
as one composite is misclassified, and challenge accuracy is the share of
foregrounds that no background fools. ``search`` does the worst-case search
on the device, ``results`` holds what is written and read back, ``cli`` is
``python -m eval.challenge``.
"""

from eval.challenge.cli import ChallengeStats, build_parser, main, run
from eval.challenge.search import SearchResult, composite, search

__all__ = ["ChallengeStats", "SearchResult", "build_parser", "composite", "main", "run", "search"]
