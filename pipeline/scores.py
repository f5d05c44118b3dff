"""The registry of anomaly scores: every score the project computes, named once, with what it needs.

Each entry (`Score`) says what a score is computed from, which anomaly map it pools (and the
galleries draw), how it is pooled and calibrated, and whether the fused score reads it. The
latent dataset's score columns, what a model can compute (`computable`), what `--scores`
asks for (`parse_scores`), the calibration (log or not) and the report's score tables are all
read off this table. Adding a score is one entry here plus, unless it pools an anomaly map,
its compute function in `pipeline.scoring.COMPUTE`.

This module holds no torch: the report's scan tasks and the threshold policy import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.errors import InputError

# What a score is computed from (`Score.needs`). Each is a set of inputs the scorer must have:
# "reconstruction": the image and the model's reconstruction (every model);
# "bank": the model's outputs against its training bank (models exported with one);
# "head": the model's learned defect map (models trained with --defect-head);
# "patches": the encoder's mid-level feature maps against the model's patch bank, a memory of
#   the training images' local features (models trained with --patch-bank; pipeline.patch_memory);
# "colours": the image's pixels against the model's colour memory, a histogram of the training
#   images' pixel values (models exported since it was added; pipeline.colour_memory);
# "scores": other scores (the fused score: its parts, and the calibration that puts them on one scale).
NEEDS = ("reconstruction", "bank", "head", "patches", "colours", "scores")
MAPS = ("err", "ssim", "gms", "defect", "patch", "colour")  # pipeline.scoring's maps
# "max" and "top" pool a map's grid (pipeline.scoring.POOLS); "mean" is a whole-image mean
# with its own compute function.
POOLS = ("max", "top", "mean")


@dataclass(frozen=True)
class Score:
    """One anomaly score (larger = more anomalous)."""

    name: str  # its column in the latent dataset
    needs: str  # what it is computed from: one of NEEDS
    about: str  # one line for --help and the README
    map: str | None = None  # the anomaly map it reads, one of MAPS; None: none (the galleries show "err")
    pool: str | None = None  # how that map becomes one number: one of POOLS; None for scores that read no map
    log: bool = True  # calibrated on log(score) (positive, spread multiplicatively); False: already a z scale
    fused: bool = False  # one of the fused score's parts by default (FUSED_FROM)

    def __post_init__(self) -> None:
        if self.needs not in NEEDS or (self.map or MAPS[0]) not in MAPS or (self.pool or POOLS[0]) not in POOLS:
            raise ValueError(f"score {self.name!r}: needs one of {NEEDS}, map one of {MAPS}, pool one of {POOLS}")

    @property
    def pools_grid(self) -> bool:
        """Computed by pooling its map's grid (no compute function of its own)."""
        return self.map is not None and self.pool in ("max", "top")


def _map_scores(map_name: str, what: str, top_fused: bool = False) -> tuple[Score, Score]:
    """A map's two pooled scores: `<map>_max` and `<map>_top`."""
    return (Score(f"{map_name}_max", "reconstruction", f"peak of the {what} map", map_name, "max"),
            Score(f"{map_name}_top", "reconstruction", f"mean of the worst 5% of the {what} map's cells",
                  map_name, "top", fused=top_fused))


# In column order. The fused parts (mse, ssim_top, stem_knn, colour_top) and DEFAULT_SCORE are the choice the
# README's detection section explains (docs/BENCHMARKS.md, bench/detection.py).
SCORES: dict[str, Score] = {s.name: s for s in (
    Score("mse", "reconstruction", "mean squared error over the image's pixels", "err", "mean", fused=True),
    Score("ssim_error", "reconstruction", "1 - the mean SSIM (window sigma 1.5 px) over the map grid's valid cells",
          "ssim", "mean"),
    *_map_scores("err", "squared error"),
    *_map_scores("ssim", "1 - SSIM", top_fused=True),
    *_map_scores("gms", "1 - multi-scale gradient-magnitude similarity"),
    Score("latent_knn", "bank", "mean distance of the latent to its 10 nearest training latents"),
    Score("stem_knn", "bank", "mean distance of the stem statistics to their 10 nearest training images'",
          fused=True),
    Score("defect_max", "head", "peak of the learned defect map (the defect head's probability)", "defect", "max"),
    Score("defect_top", "head", "mean of the worst 5% of the learned defect map's cells", "defect", "top"),
    Score("patch_knn_max", "patches", "peak of the map of each location's distance to its nearest training patch",
          "patch", "max"),
    Score("patch_knn_top", "patches", "mean of the worst 5% of the nearest-training-patch distance map's cells",
          "patch", "top"),
    Score("colour_max", "colours", "peak of the map of each pixel's rarity among the training pixels' colours",
          "colour", "max"),
    Score("colour_top", "colours", "mean of the worst 5% of the colour-rarity map's cells", "colour", "top",
          fused=True),
    Score("fused", "scores", "the largest robust z of the fused parts", log=False),
)}

SCORE_COLUMNS = tuple(SCORES)  # the latent dataset's score columns, in order
DEFAULT_SCORE = "fused"  # the score a model flags by unless told otherwise
FUSED_FROM = tuple(name for name, s in SCORES.items() if s.fused)
ALL = "all"  # --scores all


def score_spec(name: str) -> Score:
    """The registry's entry for `name`; InputError naming the valid ones otherwise."""
    if name not in SCORES:
        raise InputError(f"unknown score {name!r}; the scores are: {', '.join(SCORE_COLUMNS)}")
    return SCORES[name]


def names_needing(*needs: str) -> tuple[str, ...]:
    """The scores computed from any of `needs`, in column order."""
    return tuple(name for name, s in SCORES.items() if s.needs in needs)


def computable(has_bank: bool, fused_from: Sequence[str] = (), has_head: bool = False,
               has_patch_bank: bool = False, has_colours: bool = False) -> tuple[str, ...]:
    """Every score a model can compute: from the reconstruction always, from its training bank,
    defect head, patch bank or colour memory when it has one, the fused score when its
    calibration says how to fuse and every part is there."""
    names = names_needing("reconstruction", *(("bank",) if has_bank else ()), *(("head",) if has_head else ()),
                          *(("patches",) if has_patch_bank else ()), *(("colours",) if has_colours else ()))
    fused = [name for name in names_needing("scores") if fused_from and set(fused_from) <= set(names)]
    return (*names, *fused)


def with_inputs(names: Iterable[str], fused_from: Sequence[str] = ()) -> tuple[str, ...]:
    """`names` and every score they read (the fused score's parts), in column order."""
    wanted = set(names)
    if any(SCORES[name].needs == "scores" for name in wanted):
        wanted |= set(fused_from)
    return tuple(name for name in SCORE_COLUMNS if name in wanted)


def named_scores(text: str) -> tuple[str, ...]:
    """The names in a `--scores` value: ("all",), or registered names given comma-separated;
    InputError listing the valid values for anything else."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if names == (ALL,):
        return names
    unknown = [name for name in names if name not in SCORES]
    if not names or unknown:
        told = f"unknown score(s) {', '.join(map(repr, unknown))}; " if unknown else ""
        raise InputError(f"--scores {text!r}: {told}give {ALL} or a comma-separated list of: {', '.join(SCORE_COLUMNS)}")
    return names


def parse_scores(text: str | None, available: Sequence[str] = SCORE_COLUMNS, flag_score: str = DEFAULT_SCORE,
                 fused_from: Sequence[str] = FUSED_FROM) -> tuple[str, ...]:
    """The scores `--scores` asks for, in column order: None -> `flag_score` (the one that sets
    is_anomaly), what it reads, and mse; "all" -> every score in `available` (what the model can
    compute); "a,b" -> those named and what they read (fused: its parts). InputError for an
    unknown name, one the model cannot compute, or a list without `flag_score`."""
    if text is None:
        wanted = (flag_score, "mse")
    else:
        wanted = named_scores(text)
        wanted = tuple(available) if wanted == (ALL,) else wanted
    chosen = with_inputs(wanted, fused_from)
    missing = [name for name in chosen if name not in available]
    if missing:
        raise InputError(f"--scores: the model cannot compute {', '.join(missing)} (it computes "
                         f"{', '.join(available)}; the neighbour scores need a model exported with a training bank)")
    if flag_score not in chosen:
        raise InputError(f"--scores {text}: the score that sets is_anomaly, {flag_score}, is not among them: "
                         f"add it, or pass --score naming one of {', '.join(chosen)}")
    return chosen


def map_for_score(score: str, fused_from: Sequence[str] = ()) -> str:
    """The anomaly map that shows where a score comes from: its own; for a score of scores the
    first of its parts that reads one; the squared error for scores that read none."""
    parts = fused_from if SCORES.get(score) and SCORES[score].needs == "scores" else (score,)
    return next((SCORES[part].map for part in parts if part in SCORES and SCORES[part].map), "err")


def require_scores(present: Iterable[str], needed: Iterable[str], where: str, what: str) -> None:
    """InputError naming each score in `needed` that `present` lacks (`what` says who needs them)."""
    present = set(present)
    missing = [name for name in needed if name not in present]
    if missing:
        raise InputError(f"{what} needs the score(s) {', '.join(missing)}, which {where} does not have "
                         f"(it has: {', '.join(n for n in SCORE_COLUMNS if n in present) or 'none'}); "
                         "embed again with --scores naming them, or --scores all")
