"""batches.py -- training data: preference rows -> tokenized Examples -> packed Batches.

    examples, stats = load_pairs("pairs.jsonl", tokenizer, max_len)   # rows read and checked by formats.py
    for step_pairs in epoch_batches(examples, batch_size, seed, epoch):
        batch = collate([examples[i] for i in step_pairs], pad_id, use_lm=True, with_margins=True)

Every sequence is tokenized and cut as model.py scores it (render_prompt, answer_ids, fit). A Batch packs the
chosen, rejected and teacher-answer rows of a micro-batch into bins (several sequences per row; position ids restart
for each, so attention stays block-diagonal), which leaves almost no padding. DataStats and the cut counts say what
was dropped and cut, with a warning when many sequences lose most of their prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from formats import DataError, parse_row, read_source_rows, source_problem
from loss import LEARNS_TIES, NEEDS_MARGINS, PAIRWISE_KINDS
from model import CutCounts, answer_ids, encode, fit, layout_cost, render_prompt

MOST_PROMPT_LOST_WARN = 0.10  # warn when more than this share of sequences keep under half of their prompt


@dataclass
class Example:
    prompt: tuple  # (prompt ids of the chosen row, of the rejected row): cut to fit each row
    chosen: list  # answer token ids, eos included unless the answer's end was cut
    rejected: list
    margin: float | None
    teacher: tuple | None  # (prompt ids, teacher answer ids): the LM target
    prompt_len: int = 0  # tokens of the whole rendered prompt, before cutting
    cuts: tuple = (None, None, None)  # fit()'s cut kind of the chosen, rejected and teacher-answer sequence


ROW_KINDS = {"reward": "chosen/rejected sequences", "teacher": "teacher-answer sequences"}


def count_cuts(examples, teacher):
    """The cuts of the sequences a run uses: both reward rows of every pair, and the teacher-answer rows only
    when the LM term trains on them (teacher=True; never in eval splits)."""
    cuts = {"reward": CutCounts(), **({"teacher": CutCounts()} if teacher else {})}
    for ex in examples:
        cuts["reward"].add(ex.cuts[0], len(ex.prompt[0]), ex.prompt_len)
        cuts["reward"].add(ex.cuts[1], len(ex.prompt[1]), ex.prompt_len)
        if teacher and ex.teacher is not None:
            cuts["teacher"].add(ex.cuts[2], len(ex.teacher[0]), ex.prompt_len)
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


def tokenize_example(tokenizer, parsed, max_len, stats):
    messages, chosen, rejected, margin, teacher = parsed
    prompt = encode(tokenizer, render_prompt(tokenizer, messages))
    chosen_ids, rejected_ids = answer_ids(tokenizer, chosen), answer_ids(tokenizer, rejected)
    if chosen_ids == rejected_ids:
        stats.drop("chosen == rejected")
        return None
    p_c, chosen_ids, chosen_cut = fit(prompt, chosen_ids, max_len)
    p_r, rejected_ids, rejected_cut = fit(prompt, rejected_ids, max_len)
    if p_c + chosen_ids == p_r + rejected_ids:
        stats.drop("identical after cutting to max_len")
        return None
    teacher_pair, teacher_cut = None, None
    if teacher and teacher.strip():
        p_t, teacher_ids, teacher_cut = fit(prompt, answer_ids(tokenizer, teacher), max_len)
        teacher_pair = (p_t, teacher_ids)
    return Example(prompt=(p_c, p_r), chosen=chosen_ids, rejected=rejected_ids, margin=margin,
                   teacher=teacher_pair, prompt_len=len(prompt), cuts=(chosen_cut, rejected_cut, teacher_cut))


def check_data_file(option, path):
    """A one-line error when --option=path is not a data source (before anything loads)."""
    problem = source_problem(path)
    if problem:
        raise DataError(f"--{option}={problem}")


def load_pairs(paths, tokenizer, max_len, need_margin=False, name="data", teacher=False, keep_ties=True, keys=None):
    """Data source(s) -> tokenized Examples and the DataStats of what was dropped and cut (teacher: count the
    teacher-answer rows too, for a run that trains on them; keep_ties=False drops margin-0 pairs; keys: columns
    to rename, see formats.column_keys)."""
    stats, examples = DataStats(), []
    for path in paths.split(","):
        try:
            rows = list(read_source_rows(path, keys))
        except ValueError as e:
            raise DataError(str(e)) from None
        for line_no, row in rows:
            stats.rows += 1
            parsed = parse_row(row, f"{path}:{line_no}")
            if need_margin and parsed[3] is None:
                raise DataError(margin_needed(f"{path}:{line_no}", row))
            if parsed[3] == 0 and not keep_ties:  # "equally good": only a loss of loss.LEARNS_TIES learns it
                stats.drop(f"margin 0 (style-equivalence pair; only --loss={'/'.join(LEARNS_TIES)} learns it)")
                continue
            example = tokenize_example(tokenizer, parsed, max_len, stats)
            if example is not None:
                examples.append(example)
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"{paths}: no usable pairs ({stats.summary(name)})")
    stats.cuts = count_cuts(examples, teacher)
    return examples, stats


def margin_needed(where, row):
    """The error for a label-only pair under a loss of loss.NEEDS_MARGINS, naming a loss that needs no margins."""
    fix = "--loss=" + next(k for k in PAIRWISE_KINDS if k not in NEEDS_MARGINS)
    fix += "" if "teacher_response" in row else " --lm-weight=0 (no teacher_response either)"
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
    "rejected" | "teacher", example index) of answers[k]; lm_starts[k]: where a teacher answer's LM target starts
    in answers[k] (0 when it follows the shared prompt directly)."""
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
            group = Group(ex.prompt[0], [ex.chosen, ex.rejected], [("chosen", e), ("rejected", e)], [None, None])
            if teacher is not None and teacher[0] == ex.prompt[0]:
                group.answers.append(teacher[1]), group.roles.append(("teacher", e)), group.lm_starts.append(0)
                teacher = None
            groups.append(group)
        else:
            fell_back += share
            groups += [Group([], [ex.prompt[0] + ex.chosen], [("chosen", e)], [None]),
                       Group([], [ex.prompt[1] + ex.rejected], [("rejected", e)], [None])]
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
                if role == "teacher":
                    lm_index += ([prompt_end] if start == 0 else []) + list(range(flat + max(start, 1) - 1,
                                                                                  flat + len(answer) - 1))
                    lm_target += answer[start:]
                else:  # chosen row of example e first, rejected rows after all chosen rows
                    last[e + (n_pairs if role == "rejected" else 0)] = flat + len(answer) - 1
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
    return Batch(as_tensor(ids), as_tensor(positions), torch.tensor(last), torch.tensor(lm_index, dtype=torch.long),
                 torch.tensor(lm_target, dtype=torch.long), None, n_pairs, sum(lengths),
                 as_tensor(sequences) if shared else None, as_tensor(branches) if shared else None)


def epoch_batches(examples, batch_size, seed, epoch):
    """Deterministic order of one epoch: shuffle, group by length within windows, shuffle the groups."""
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(examples[i].prompt[0]) + len(examples[i].chosen)
                       + len(examples[i].rejected))
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def to_device(batch, device):
    return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})
