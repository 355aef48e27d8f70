"""The accuracy studies a sweep can run (`sweep.py --study NAME`): the model, the configs, the learning-rate grids,
the run order, the data sizes, each run's share of the GPU and the targets. Recipe, launcher and aggregate are shared.

    smollm2  issue 8, the default (so the committed studies/accuracy/results/smollm2 regenerates as it was made):
             SmolLM2-135M-Instruct; full, LoRA r8 / r16, DoRA r8, sparse {random, l2, taylor, hessian, zeroth_order}
             x {per_layer, global} x {rows, columns}; 4,000 training examples, 200 items per test set.
    qwen15   issue 17: Qwen2.5-Coder-1.5B-Instruct, bf16 weights (full FT: fp32 master weights); zero-shot, full,
             LoRA r16, DoRA r16, sparse per-layer rows {taylor, zeroth_order, l2, random}, and one columns config
             picked on validation; 6,000 training examples, 200 validation items per training task, 500 items per
             test set; a solo phase for peak memory and tokens/s. Results: studies/accuracy/results/qwen15.
             Second round (QWEN15_NEW_RUNS selects it): coupled neurons {random, taylor}, random columns at 8 bytes
             per trained number and at LoRA r16's peak memory, then (seed 1) the NF4 merge: QLoRA r16 and random
             columns on an NF4 base, with and without the low-quantization-error start.

A results folder says which study made it in study.json (none: smollm2, the folder of issue 8).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from studies.accuracy import grid
from studies.accuracy.grid import Config, LlamaShape, Run

STUDY_FILE = "study.json"


@dataclass(frozen=True)
class Study:
    name: str
    issue: int
    model: str                                    # for titles
    shape: LlamaShape                             # sparse budgets when the model folder has no config.json
    families: tuple[str, ...]                     # table, colour and lr-family order
    lr_grids: Mapping[str, tuple[float, ...]]     # family -> its learning-rate grid (families that train)
    tune_configs: Mapping[str, tuple[str, ...]]   # family -> the configs tuned for it; with several, the best
    #                                               (config, lr) on validation is the family's test config
    build_configs: Callable[[LlamaShape, int, float], dict[str, Config]]  # (shape, calibration batches, dropout)
    test_names: Optional[tuple[str, ...]] = None  # test-phase configs in order; "@family": its tuned config;
    #                                               None: every config
    smoke_sparse: Optional[tuple[tuple[str, str, str], ...]] = None  # --smoke: the sparse configs tested
    defaults: Mapping[str, Any] = field(default_factory=dict)  # sweep options whose study value differs
    targets: tuple[tuple[str, str, float], ...] = ()  # (comparison, reference config, required margin in points)
    slots: Mapping[str, int] = field(default_factory=dict)  # config name, else family -> parallel slots a run
    #                                                          takes (default 1)
    checks_training: bool = False                 # the aggregate refuses / flags runs that did not train
    phases: tuple[str, ...] = ("test", "tune")    # the aggregate's phases ("solo": memory / speed runs)
    late_names: tuple[str, ...] = ()              # test configs run after every seed of the others, at late_seeds
    late_seeds: tuple[int, ...] = (grid.TUNE_SEED,)
    pair_targets: tuple[tuple[str, str, str, float], ...] = ()  # (comparison, config, reference, required margin)
    not_ours: tuple[str, ...] = ()                # sparse configs never "ours" in the targets: above LoRA's
    #                                               trainable budget (sized to its memory instead), or a side question
    #                                               on another base
    equal_memory: tuple[tuple[str, str], ...] = ()  # (config, reference): the aggregate compares their test runs'
    #                                                 own peak memory

    @property
    def has_solo(self) -> bool:
        """The study measures each config alone on the device (its memory / speed values)."""
        return "solo" in self.phases

    # ------------------------------------------------------------ learning rates
    def lr_grid(self, family: str, smoke: bool = False) -> tuple[float, ...]:
        lrs = self.lr_grids[family]
        return (lrs[len(lrs) // 2],) if smoke else lrs  # smoke: the middle one

    def default_lr(self, family: str) -> float:
        """Used when no validation run of a family finished (the middle of its grid)."""
        return self.lr_grid(family, smoke=True)[0]

    def _lr(self, config: Config, lrs: Mapping[str, float]) -> Optional[float]:
        return lrs[config.family] if config.family in self.lr_grids else None  # None: trains nothing

    # ------------------------------------------------------------ the run lists
    def configs(self, shape: LlamaShape, calibration_batches: int, lora_dropout: float = 0.05) -> dict[str, Config]:
        return self.build_configs(shape, calibration_batches, lora_dropout)

    def tune_runs(self, cfgs: Mapping[str, Config], seed: int = grid.TUNE_SEED, smoke: bool = False) -> list[Run]:
        """Each family's tuned configs at every lr of its grid, one seed; one lr of every family, then the next."""
        runs = [Run("tune", cfgs[c], seed, lr) for f, names in self.tune_configs.items()
                for lr in self.lr_grid(f, smoke) for c in names]
        return sorted(runs, key=lambda r: self.lr_grids[r.config.family].index(r.lr))

    def _resolve(self, cfgs: Mapping[str, Config], picks: Optional[Mapping[str, str]]) -> list[Config]:
        """The test-phase configs; "@family" becomes the family's pick (picks None: every candidate)."""
        out = []
        for name in self.test_names or [n for n in cfgs if n not in self.late_names]:
            if not name.startswith("@"):
                out.append(cfgs[name])
                continue
            fam = name[1:]
            names = self.tune_configs[fam] if picks is None else (picks.get(fam) or self.tune_configs[fam][0],)
            out += [cfgs[n] for n in names]
        return out

    def test_configs(self, cfgs: Mapping[str, Config], picks: Mapping[str, str], smoke: bool = False) -> list[Config]:
        """--smoke keeps the non-sparse configs and those of smoke_sparse (when the study names some)."""
        out = self._resolve(cfgs, picks)
        if smoke and self.smoke_sparse is not None:
            keep = {f"sparse_{i}_{s}_{a}" for i, s, a in self.smoke_sparse}
            out = [c for c in out if c.method != "sparse" or c.name in keep]
        return out

    def test_runs(self, cfgs: Mapping[str, Config], lrs: Mapping[str, float], picks: Mapping[str, str],
                  seeds: Sequence[int] = grid.TEST_SEEDS, smoke: bool = False) -> list[Run]:
        """Every test config at its family's tuned lr; all configs get a seed before any gets the next, so a
        budget cut leaves every config covered with fewer seeds. Then the late configs, at late_seeds (those of
        `seeds`)."""
        runs = [Run("test", c, s, self._lr(c, lrs)) for s in seeds for c in self.test_configs(cfgs, picks, smoke)]
        late = [cfgs[n] for n in self.late_names]
        return runs + [Run("test", c, s, self._lr(c, lrs)) for s in self.late_seeds if s in seeds for c in late]

    def solo_runs(self, cfgs: Mapping[str, Config]) -> list[Run]:
        """Every trained test config alone on the device (peak memory, tokens/s, scoring time), every candidate of
        a picked family (so that the solo phase needs no finished tuning), seed 1, at its grid's middle lr (memory
        and speed do not depend on it)."""
        return [Run("solo", c, grid.TUNE_SEED, self.default_lr(c.family)) for c in self._resolve(cfgs, None)
                if c.family in self.lr_grids]

    def run_slots(self, config: Config) -> int:
        return self.slots.get(config.name, self.slots.get(config.family, 1))


# ---------------------------------------------------------------- issue 8: SmolLM2-135M-Instruct

# LoRA r8 uses the lora family's lr (tuned on r16); every sparse importance / scope the lr of its axis' family
# (tuned on l2 per_layer)
SMOLLM2 = Study(
    name="smollm2", issue=8, model="SmolLM2-135M-Instruct", shape=grid.SMOLLM2_135M,
    families=("full", "lora", "dora", "sparse_rows", "sparse_columns"),
    lr_grids={"full": (2e-5, 5e-5, 1e-4), "lora": (2e-4, 5e-4, 1e-3), "dora": (2e-4, 5e-4, 1e-3),
              "sparse_rows": (3e-4, 1e-3, 3e-3), "sparse_columns": (3e-4, 1e-3, 3e-3)},
    tune_configs={"full": ("full",), "lora": ("lora_r16",), "dora": ("dora_r8",),
                  "sparse_rows": ("sparse_l2_per_layer_rows",), "sparse_columns": ("sparse_l2_per_layer_columns",)},
    build_configs=grid.configs,
    # --smoke: a weight criterion per layer on rows, a data-driven one with a global budget on columns (both axes,
    # both scopes, calibration included)
    smoke_sparse=(("l2", "per_layer", "rows"), ("taylor", "global", "columns")),
    targets=(("ours − LoRA r16", "lora_r16", 1.0), ("ours − DoRA r8", "dora_r8", -0.5),
             ("ours − full FT", "full", 0.0)),
)


# ---------------------------------------------------------------- issue 17: Qwen2.5-Coder-1.5B-Instruct

QWEN15_ROWS = ("taylor", "zeroth_order", "l2", "random")
# the columns candidates, each tuned at its own lr: in the 135M study taylor columns (the high-activation features)
# lost the answer format at the lr tuned on l2 columns and kept it at a ~10x lower one; random columns kept it
QWEN15_COLUMNS = ("random", "taylor")


# The second round (after the committed 59 runs; same data, seeds and names, so those are skipped), in the order the
# sweep runs it: coupled neurons (the library's axis "coupled", at the rows' k; their own lr family, tuned on random
# only), random columns at 8 bytes per trained number (bf16 slices, int8 moments, compensated updates: the same config
# as the tuned random columns, so its lr), random columns at LoRA r16's peak memory (its k below; its own lr family),
# then last, at 3 seeds, the NF4 merge: QLoRA r16 and random rows on an NF4 base (with and without the
# low-quantization-error start), each evaluated after training and again after merging back into NF4 (the recipe's
# --eval_merged_nf4).
QWEN15_COUPLED = ("random", "taylor")
QWEN15_8BYTE = ("--slice_dtype", "bfloat16", "--optimizer_state", "int8", "--compensated_update", "true")
# Equal memory. Solo peaks (torch max allocated, studies/accuracy/results/qwen15/runs/solo-*): LoRA r16
# 24,965,415,936 B (23,809 MiB), random columns k = 28 19,205,614,592 B (18,316 MiB). Each further column per layer
# costs (grid.equal_memory_columns_k) 18 B x 645,120 trained numbers (fp32 slice, grad, two Adam moments, autocast's
# bf16 copy) + 2 B x 4,096 tokens x 28 layers x 7 linears of saved x[..., J] = 13,217,792 B. 4,096 = 16 x 256 is the
# most a step can hold (max_length 256; the solo runs averaged 1,585 non-padding tokens per step, 317,077 in 200,
# and the peak comes at a long batch); the larger count gives the smaller k. (24,965,415,936 - 19,205,614,592) //
# 13,217,792 = 435 -> k = 463 (298,690,560 trained numbers, 16x LoRA's), predicted peak 24,955,354,112 B <= LoRA's;
# its test runs record their own peak (accuracy.md: "Equal memory").
QWEN15_LORA_PEAK, QWEN15_COLUMNS_PEAK, QWEN15_COLUMNS_K = 24_965_415_936, 19_205_614_592, 28
QWEN15_TOKENS_PER_STEP = 16 * 256
QWEN15_NEW = ("sparse_random_per_layer_coupled", "sparse_taylor_per_layer_coupled",
              "sparse_random_per_layer_columns_8byte", "sparse_random_per_layer_columns_eqmem")
QWEN15_NF4 = ("qlora_r16", "sparse_random_per_layer_rows_nf4", "sparse_random_per_layer_rows_nf4_init")
# sweep.py --only: exactly the second round's runs (tune, test and solo names)
QWEN15_NEW_RUNS = "coupled|_8byte|_eqmem|_nf4|qlora"


def qwen15_configs(shape: LlamaShape, calibration_batches: int, lora_dropout: float = 0.05) -> dict[str, Config]:
    out = [grid.zero_shot_config(), grid.full_config(), grid.lora_config(shape, 16, "lora", lora_dropout),
           grid.lora_config(shape, 16, "dora", lora_dropout)]
    out += [grid.sparse_config(shape, i, "per_layer", "rows", calibration_batches) for i in QWEN15_ROWS]
    out += [grid.sparse_config(shape, i, "per_layer", "columns", calibration_batches) for i in QWEN15_COLUMNS]
    out += [grid.sparse_config(shape, i, "per_layer", "coupled", calibration_batches) for i in QWEN15_COUPLED]
    columns = next(c for c in out if c.name == "sparse_random_per_layer_columns")  # the tuned pick
    rows = next(c for c in out if c.name == "sparse_random_per_layer_rows")
    k = grid.equal_memory_columns_k(shape, QWEN15_LORA_PEAK, QWEN15_COLUMNS_PEAK, QWEN15_COLUMNS_K,
                                    QWEN15_TOKENS_PER_STEP)
    merged = ("--eval_merged_nf4", "true")
    out += [grid.variant(columns, "8byte", QWEN15_8BYTE),
            grid.variant(columns, "eqmem", (), grid.sparse_params(shape, k, "columns"), neurons_per_layer=k,
                         family="sparse_eqmem"),
            grid.qlora_config(shape, 16, lora_dropout, merged),
            # rows on NF4, as the paper: a merged row re-quantizes only its own blocks (a column reaches a block
            # of every row)
            grid.variant(rows, "nf4", ("--quantize_base", "nf4", *merged)),
            grid.variant(rows, "nf4_init", ("--quantize_base", "nf4", "--init_from_quantization_error", "true",
                                            *merged))]
    return {c.name: c for c in out}


# Data sizes, by GPU time: a run must finish inside one device call (<= 10 min) while sharing the GPU with six
# others, since an unfinished run is lost (the sweep resumes whole runs). 6,000 examples (the measured setup of
# issue 17: 375 steps of 16, ~0.9 M padded tokens) fit; all 17,754 (1,110 steps, ~2.1 M) would take ~3x as long.
# 200 validation items per training task (800 in all: ~1.6 points of standard error at 70 %) out of the training
# files; 500 items per test set (ARC-Challenge's validation split has 299: all of them).
QWEN15 = Study(
    name="qwen15", issue=17, model="Qwen2.5-Coder-1.5B-Instruct", shape=grid.QWEN25_CODER_15B,
    families=("zero_shot", "full", "lora", "dora", "sparse_rows", "sparse_columns", "sparse_coupled",
              "sparse_eqmem"),
    # the first grids' best lr sat at their low edge for full FT (1e-5), l2 rows (1e-4) and taylor columns
    # (1e-4) on validation (studies/accuracy/results/qwen15, tune phase): those families got one lower lr.
    # Full FT's best then moved to the new edge (5e-6: 75.6 vs 73.5 at 1e-5), so it got 2e-6 too: a baseline
    # tuned only up to its grid's edge would flatter ours. LoRA's and DoRA's best (3e-4) is inside their grids.
    lr_grids={"full": (2e-6, 5e-6, 1e-5, 2e-5, 5e-5), "lora": (1e-4, 3e-4, 1e-3), "dora": (1e-4, 3e-4, 1e-3),
              "sparse_rows": (3e-5, 1e-4, 3e-4, 1e-3), "sparse_columns": (3e-5, 1e-4, 3e-4, 1e-3),
              # coupled: the two lrs around the rows' (1e-4) and columns' (3e-4) tuned ones (GPU time); a 2-lr grid's
              # default (no run finished) is its upper lr, 3e-4
              "sparse_coupled": (1e-4, 3e-4),
              # equal memory trains 16x the columns' numbers: at the columns' tuned lr (3e-4) its first test run
              # lost the answer format (21.5 %, constant answers), so it got its own lrs below that one (a run at
              # 3e-4 cannot win a validation; GPU time)
              "sparse_eqmem": (3e-5, 1e-4)},
    # rows: every criterion takes the lr tuned on l2 rows, as in issue 8 (one tuning per criterion would double
    # the tune phase); coupled: taylor takes the lr tuned on random
    tune_configs={"full": ("full",), "lora": ("lora_r16",), "dora": ("dora_r16",),
                  "sparse_rows": ("sparse_l2_per_layer_rows",),
                  "sparse_columns": tuple(f"sparse_{i}_per_layer_columns" for i in QWEN15_COLUMNS),
                  "sparse_coupled": ("sparse_random_per_layer_coupled",),
                  "sparse_eqmem": ("sparse_random_per_layer_columns_eqmem",)},
    build_configs=qwen15_configs,
    test_names=("zero_shot", "full", "lora_r16", "dora_r16", *(f"sparse_{i}_per_layer_rows" for i in QWEN15_ROWS),
                "@sparse_columns", *QWEN15_NEW),
    defaults={"max_train_samples": 6000, "validation_per_task": 200, "max_eval_samples": 500, "logging_steps": 10,
              "parallel": 11},
    targets=(("ours − LoRA r16", "lora_r16", 0.0), ("ours − DoRA r16", "dora_r16", -0.5),
             ("ours − full FT", "full", -1.0)),
    # slots of ~12 GiB, 11 on the H200 (139.8 GiB): the peaks measured in the tune phase (torch's peak allocated,
    # +~2 GiB per process for the CUDA context and cache) were full FT 42.1 GiB (fp32 master weights + AdamW),
    # DoRA 35.5, LoRA 23.7, sparse rows 20.7, columns 18.3; 7 runs at once ran 3 of them out of memory
    # (coupled: rows and columns, ~20 GiB; equal memory: LoRA's peak by construction, so LoRA's 3)
    slots={"full": 4, "dora": 4, "lora": 3, "sparse_rows": 2, "sparse_columns": 2, "sparse_coupled": 2,
           "sparse_random_per_layer_columns_eqmem": 3},
    checks_training=True,
    phases=("test", "tune", "solo"),
    # the NF4 merge at the protocol's 3 seeds, after every seed of the rest (the merge target needs its std)
    late_names=QWEN15_NF4,
    late_seeds=grid.TEST_SEEDS,
    # the 8-byte setting is the same config at half the bytes per trained number: it must keep the accuracy
    pair_targets=(("8 bytes − 16 bytes per trained number", "sparse_random_per_layer_columns_8byte",
                   "sparse_random_per_layer_columns", -0.3),),
    not_ours=("sparse_random_per_layer_columns_eqmem", *QWEN15_NF4[1:]),
    equal_memory=(("sparse_random_per_layer_columns_eqmem", "lora_r16"),),
)

STUDIES = {s.name: s for s in (SMOLLM2, QWEN15)}


def get(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return STUDIES[name]


def of_folder(out: str | Path) -> Study:
    """The study that made a results folder (its study.json; none: smollm2, the folder of issue 8)."""
    path = Path(out) / STUDY_FILE
    return get(json.loads(path.read_text())["study"]) if path.is_file() else SMOLLM2


def mark_folder(out: str | Path, study: Study) -> None:
    """Record the study in a results folder, refusing a folder another study made (their runs' names and tables
    would mix). smollm2 writes nothing, so the folder of issue 8 stays as committed."""
    out = Path(out)
    found = of_folder(out)
    has_runs = (out / "runs").is_dir() and any((out / "runs").iterdir())
    if found is not study and (found is not SMOLLM2 or has_runs):
        raise SystemExit(f"{out} holds the {found.name!r} study's runs: give --study {study.name} its own --out")
    if study is not SMOLLM2:
        out.mkdir(parents=True, exist_ok=True)
        (out / STUDY_FILE).write_text(json.dumps({"study": study.name, "issue": study.issue}) + "\n")
