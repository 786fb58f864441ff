"""batches.py -- training data: preference rows -> tokenized pairs (pair_cache.py) -> epoch order -> packed Batches.

    examples, stats = load_pairs("pairs.jsonl", tokenizer, max_len)   # rows read and checked by formats.py
    for step_pairs in epoch_batches(examples, batch_size, seed, epoch):
        batch = collate([examples[i] for i in step_pairs], pad_id, use_lm=True, with_margins=True)

Every sequence is tokenized and cut as model.py scores it (render_prompt, answer_ids, fit), once per data file when
load_pairs gets a cache_dir (pair_cache.py: flat token arrays on disk, memory-mapped by every process), else in
memory; either way `examples` is a pair_cache.PairStore, a sequence of Examples read on demand. A Batch packs the
chosen, rejected and teacher-answer rows of a micro-batch into bins (several sequences per row, attention kept
within each), which leaves almost no padding; with layout="shared" a pair's prompt is computed once for all its
answers. DataStats and the cut counts say what was dropped and cut, with a warning when many sequences lose most of
their prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import pair_cache
from formats import DataError, source_problem
from loss import LEARNS_TIES, NEEDS_MARGINS, PAIRWISE_KINDS
from model import CutCounts, layout_cost, predicting_slots
from pair_cache import CUTS, Example, PairStore  # noqa: F401  Example: the row type, defined with its store

MOST_PROMPT_LOST_WARN = 0.10  # warn when more than this share of sequences keep under half of their prompt
TIES = f"margin 0 (style-equivalence pair; only --loss={'/'.join(LEARNS_TIES)} learns it)"  # loss.py says who


ROW_KINDS = {"reward": "chosen/rejected sequences", "teacher": "teacher-answer sequences"}


def count_cuts(examples: PairStore, teacher):
    """The cuts of the sequences a run uses: both reward rows of every pair, and the teacher-answer rows only
    when the LM term trains on them (teacher=True; never in eval splits). Counted as CutCounts.add counts."""
    cuts = {"reward": CutCounts(), **({"teacher": CutCounts()} if teacher else {})}
    prompt_len = examples.column("prompt_len")
    for kind, row in (("reward", "chosen"), ("reward", "rejected")) + ((("teacher", "teacher"),) if teacher else ()):
        kept, cut = examples.column("kept_" + row), examples.column("cut_" + row)
        present = kept >= 0  # a pair without a teacher answer has no teacher row
        counts = cuts[kind]
        counts.sequences += int(present.sum())
        for code, name in enumerate(CUTS):
            setattr(counts, name or "whole", getattr(counts, name or "whole") + int((cut[present] == code).sum()))
        counts.most_prompt_lost += int((kept[present] < prompt_len[present] / 2).sum())
    return cuts


def cut_warnings(name, cuts, max_len):
    """A warning per kind of sequence of which more than MOST_PROMPT_LOST_WARN kept under half of their prompt."""
    out = []
    for kind, counts in cuts.items():
        if counts.sequences and counts.most_prompt_lost > MOST_PROMPT_LOST_WARN * counts.sequences:
            out.append(f"warning: {name}: {counts.most_prompt_lost} of {counts.sequences} {ROW_KINDS[kind]} "
                       f"({100 * counts.most_prompt_lost / counts.sequences:.0f}%) keep under half of their prompt "
                       f"at --max-len={max_len}; a larger --max-len keeps more of the question")
    return out


@dataclass
class DataStats:
    rows: int = 0  # rows read
    kept: int = 0  # usable pairs
    dropped: dict = field(default_factory=dict)  # reason -> count
    cuts: dict = field(default_factory=dict)  # "reward" / "teacher" -> CutCounts (count_cuts)

    def drop(self, reason):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self, name):
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        cuts = "".join(f"\n  {counts.summary(ROW_KINDS[kind])}" for kind, counts in self.cuts.items())
        return f"{name}: {self.rows} rows, {self.kept} kept; dropped: {drops}" + cuts


def check_data_file(option, path):
    """A one-line error when --option=path is not a data source (before anything loads)."""
    problem = source_problem(path)
    if problem:
        raise DataError(f"--{option}={problem}")


def load_pairs(paths, tokenizer, max_len, need_margin=False, name="data", teacher=False, keep_ties=True, keys=None,
               cache_dir=None):
    """Data source(s), comma-separated -> (PairStore of the usable pairs, DataStats of what was dropped and cut).
    teacher: count the teacher-answer rows too, for a run that trains on them; keep_ties=False drops margin-0 pairs;
    keys: columns to rename (formats.column_keys); cache_dir: tokenize once into it and map (pair_cache.load)."""
    examples, counts = pair_cache.load(paths.split(","), tokenizer, max_len, cache_dir, keys)
    stats = DataStats(rows=counts.rows, dropped=dict(counts.dropped))
    margins = examples.column("margin")
    if need_margin and np.isnan(margins).any():
        first = int(np.flatnonzero(np.isnan(margins))[0])
        file, line = (int(examples.column(c)[first]) for c in ("file", "line"))
        raise DataError(margin_needed(f"{examples.meta['paths'][file]}:{line}",
                                      bool(examples.column("teacher_field")[first])))
    if not keep_ties and (margins == 0).any():  # "equally good": only a loss of loss.LEARNS_TIES learns it
        stats.dropped[TIES] = int((margins == 0).sum())
        examples = examples.take(np.flatnonzero(margins != 0))
    stats.kept = len(examples)
    if not len(examples):
        raise DataError(f"{paths}: no usable pairs ({stats.summary(name)})")
    stats.cuts = count_cuts(examples, teacher)
    return examples, stats


def margin_needed(where, has_teacher_response):
    """The error for a label-only pair under a loss of loss.NEEDS_MARGINS, naming a loss that needs no margins."""
    fix = "--loss=" + next(k for k in PAIRWISE_KINDS if k not in NEEDS_MARGINS)
    fix += "" if has_teacher_response else " --lm-weight=0 (no teacher_response either)"
    return (f"{where}: this loss needs a preference strength: give chosen_score and rejected_score, or margin; for "
            f"label-only pairs train with {fix}")


# ----------------------------------------------------------------------------------------------------------------
# batching: examples -> packed bins

LAYOUTS = ("separate", "shared", "auto")  # collate's layout of a pair's rows, see collate


def pack(lengths, bin_len):
    """First-fit-decreasing packing of sequences (their lengths) into bins of bin_len tokens -> bins (index lists)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, space = [], []
    for i in order:
        n = lengths[i]
        slot = next((b for b in range(len(bins)) if space[b] >= n), None)
        if slot is None:
            bins.append([]), space.append(bin_len)
            slot = len(bins) - 1
        bins[slot].append(i)
        space[slot] -= n
    return bins


def pack_tightly(lengths, target_padding=0.05):
    """Bins as long as the longest sequence keep attention as cheap as plain padding; when that leaves more than
    target_padding of the slots empty, longer bins (up to 2x) fill better. Shortest bins that reach the target win."""
    longest, total = max(lengths), sum(lengths)
    best = None
    for scale in (1 + k / 16 for k in range(17)):
        bins = pack(lengths, int(longest * scale))
        padding = 1 - total / (len(bins) * max(sum(lengths[i] for i in b) for b in bins))
        if best is None or padding < best[0]:
            best = (padding, bins)
        if padding <= target_padding:
            break
    return best[1]


@dataclass
class Group:
    """One packed sequence: a prompt written once, then answers that each see that prompt and themselves only.
    An empty prompt makes it one plain sequence (answers[0] then holds prompt + answer). roles[k]: ("chosen" |
    "rejected" | "teacher", example index) of answers[k]; lm_starts[k]: where the answer itself starts in
    answers[k] (0 when it follows the shared prompt directly): a teacher answer's LM target, a reward row's
    likelihood (model.RewardModel.reward)."""
    prompt: list
    answers: list
    roles: list
    lm_starts: list

    def __len__(self):
        return len(self.prompt) + sum(map(len, self.answers))


def pair_groups(examples, use_lm, share):
    """The sequences of a micro-batch as Groups -> (groups, pairs that fell back to separate rows). share: a pair
    whose chosen and rejected rows kept the same prompt after cutting gets one Group (its teacher answer joins it
    when its prompt was cut the same way too); a pair whose rows were cut differently keeps separate rows."""
    groups, fell_back, alone = [], 0, []
    for e, ex in enumerate(examples):
        teacher = ex.teacher if use_lm and ex.teacher is not None else None
        if share and ex.prompt[0] == ex.prompt[1]:
            group = Group(ex.prompt[0], [ex.chosen, ex.rejected], [("chosen", e), ("rejected", e)], [0, 0])
            if teacher is not None and teacher[0] == ex.prompt[0]:
                group.answers.append(teacher[1]), group.roles.append(("teacher", e)), group.lm_starts.append(0)
                teacher = None
            groups.append(group)
        else:
            fell_back += share
            groups += [Group([], [ex.prompt[0] + ex.chosen], [("chosen", e)], [len(ex.prompt[0])]),
                       Group([], [ex.prompt[1] + ex.rejected], [("rejected", e)], [len(ex.prompt[1])])]
        if teacher is not None:
            alone.append(Group([], [teacher[0] + teacher[1]], [("teacher", e)], [len(teacher[0])]))
    return groups + alone, fell_back


def bins_cost(lengths, bins, key_cost):
    """model.layout_cost of packed bins (each as long as the longest)."""
    return layout_cost(len(bins), max(sum(lengths[i] for i in b) for b in bins), key_cost)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [bins, bin_len]
    position_ids: torch.Tensor  # each sequence from 0; a shared prompt's answers all continue from its end
    last: torch.Tensor  # flat index of each reward row's last token: chosen rows, then rejected rows
    lm_index: torch.Tensor  # flat indices of positions that predict a teacher-answer token
    lm_target: torch.Tensor  # the teacher-answer tokens they predict
    answer_index: torch.Tensor  # flat indices of positions that predict a chosen or rejected answer's token
    answer_target: torch.Tensor  # the answer tokens they predict
    answer_row: torch.Tensor  # which reward row (as in `last`) each belongs to
    margins: torch.Tensor | None
    n_pairs: int
    real_tokens: int  # tokens computed (a shared prompt counts once), padding not included
    # the shared layout (None: separate rows, whose block-diagonal attention transformers reads off position_ids):
    sequence_ids: torch.Tensor | None = None  # [bins, bin_len]: which packed sequence a slot belongs to
    branch_ids: torch.Tensor | None = None  # 0: a shared prompt (or a plain sequence), k: the k-th answer after it
    shared_pairs: int = 0  # pairs whose prompt was computed once
    separate_pairs: int = 0  # pairs that sharing was asked for but whose rows were cut to different prompts


def collate(examples, pad_id, use_lm, with_margins, layout="separate", key_cost=0.0):
    """One forward pass worth of examples: chosen, rejected and teacher-answer rows packed into bins.

    layout "separate": every row a sequence of its own, with its copy of the prompt (block-diagonal attention).
    "shared": a pair's prompt once; its chosen, rejected (and teacher) answers each attend to it and to themselves,
    with positions continuing from the prompt's end (pairs cut to different prompts stay separate, counted).
    "auto": whichever of the two costs less by model.layout_cost with key_cost (model.attention_key_cost): sharing
    saves the prompt copies but makes longer sequences, so longer bins with more attention; short prompts lose."""
    if layout not in LAYOUTS:
        raise ValueError(f"collate: layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    groups, fell_back = pair_groups(examples, use_lm, layout != "separate")
    lengths = [len(g) for g in groups]
    bins = pack_tightly(lengths)
    if layout == "auto":
        plain, _ = pair_groups(examples, use_lm, False)
        plain_lengths = [len(g) for g in plain]
        plain_bins = pack_tightly(plain_lengths)
        if bins_cost(plain_lengths, plain_bins, key_cost) <= bins_cost(lengths, bins, key_cost):
            groups, fell_back, lengths, bins, layout = plain, 0, plain_lengths, plain_bins, "separate"
    batch = lay_out(groups, lengths, bins, len(examples), pad_id, shared=layout != "separate")
    if with_margins:
        batch.margins = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    if layout != "separate":
        batch.shared_pairs, batch.separate_pairs = len(examples) - fell_back, fell_back
    return batch


def lay_out(groups, lengths, bins, n_pairs, pad_id, shared):
    """Groups packed into bins -> Batch (margins unset). Position t predicts token t+1 of its own sequence: a teacher
    answer that follows a shared prompt directly is predicted from the prompt's last token first."""
    bin_len = max(sum(lengths[i] for i in b) for b in bins)
    ids, positions, sequences, branches = [], [], [], []
    last, lm_index, lm_target = [0] * (2 * n_pairs), [], []
    answer_index, answer_target, answer_row = [], [], []
    for b, members in enumerate(bins):
        row_ids, row_pos, row_seq, row_branch = [], [], [], []
        for n, i in enumerate(members, 1):
            group, prompt_end = groups[i], b * bin_len + len(row_ids) + len(groups[i].prompt) - 1
            row_ids += group.prompt
            row_pos += range(len(group.prompt))
            row_seq += [n] * len(group.prompt)
            row_branch += [0] * len(group.prompt)
            for k, (answer, (role, e), start) in enumerate(zip(group.answers, group.roles, group.lm_starts), 1):
                flat = b * bin_len + len(row_ids)
                predictors = predicting_slots(flat + start, flat + len(answer),
                                              prompt_end if start == 0 else flat + start - 1)
                if role == "teacher":
                    lm_index += predictors
                    lm_target += answer[start:]
                else:  # chosen row of example e first, rejected rows after all chosen rows
                    reward_row = e + (n_pairs if role == "rejected" else 0)
                    last[reward_row] = flat + len(answer) - 1
                    answer_index += predictors
                    answer_target += answer[start:]
                    answer_row += [reward_row] * (len(answer) - start)
                row_ids += answer
                row_pos += range(len(group.prompt), len(group.prompt) + len(answer))
                row_seq += [n] * len(answer)
                row_branch += [k if group.prompt else 0] * len(answer)
        pad = bin_len - len(row_ids)  # trailing padding: one more sequence of its own, invisible to the others
        ids.append(row_ids + [pad_id] * pad)
        positions.append(row_pos + list(range(pad)))
        sequences.append(row_seq + [len(members) + 1] * pad)
        branches.append(row_branch + [0] * pad)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return Batch(as_tensor(ids), as_tensor(positions), torch.tensor(last), as_tensor(lm_index), as_tensor(lm_target),
                 as_tensor(answer_index), as_tensor(answer_target), as_tensor(answer_row), None, n_pairs, sum(lengths),
                 as_tensor(sequences) if shared else None, as_tensor(branches) if shared else None)


def sort_lengths(examples):
    """Tokens of each pair's chosen row plus its rejected answer: what epoch_batches groups pairs by."""
    if isinstance(examples, PairStore):
        return examples.column("kept_chosen") + examples.column("chosen") + examples.column("rejected")
    return np.array([len(ex.prompt[0]) + len(ex.chosen) + len(ex.rejected) for ex in examples], dtype=np.int64)


@dataclass
class EpochBatches:
    """One epoch's batches: batch k is order[b * size:(b + 1) * size] with b = batch_order[k] (index arrays)."""
    order: np.ndarray
    size: int
    batch_order: np.ndarray

    def __len__(self):
        return len(self.batch_order)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(len(self))[k]]
        b = int(self.batch_order[k])
        return self.order[b * self.size:(b + 1) * self.size]

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def epoch_batches(examples, batch_size, seed, epoch):
    """Deterministic order of one epoch (numpy arrays: a few bytes per pair): shuffle, sort by length within windows
    of 32 batches (so that a batch packs tightly), shuffle the batches."""
    lengths = sort_lengths(examples)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = np.arange(len(order)) // (batch_size * 32)
    order = order[np.lexsort((lengths[order], window))]  # by window, then by length (stable)
    return EpochBatches(order, batch_size, rng.permutation(-(-len(order) // batch_size)))


def to_device(batch, device):
    return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})
