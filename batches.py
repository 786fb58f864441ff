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

from formats import DataError, parse_row, read_jsonl_rows, source_problem
from model import CutCounts, answer_ids, encode, fit, render_prompt

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
            rows = list(read_jsonl_rows(path, keys))
        except ValueError as e:
            raise DataError(str(e)) from None
        for line_no, row in rows:
            stats.rows += 1
            parsed = parse_row(row, f"{path}:{line_no}", need_margin)
            if parsed[3] == 0 and not keep_ties:  # "equally good": only a margin loss (mse) can learn it
                stats.drop("margin 0 (style-equivalence pair; only --loss=mse learns it)")
                continue
            example = tokenize_example(tokenizer, parsed, max_len, stats)
            if example is not None:
                examples.append(example)
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"{paths}: no usable pairs ({stats.summary(name)})")
    stats.cuts = count_cuts(examples, teacher)
    return examples, stats


# ----------------------------------------------------------------------------------------------------------------
# batching: examples -> packed bins


# ----------------------------------------------------------------------------------------------------------------
# batching: examples -> packed bins


def pack(sequences, bin_len):
    """First-fit-decreasing packing of sequences into bins of bin_len tokens. Returns a list of bins (index lists)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    bins, space = [], []
    for i in order:
        n = len(sequences[i])
        slot = next((b for b in range(len(bins)) if space[b] >= n), None)
        if slot is None:
            bins.append([]), space.append(bin_len)
            slot = len(bins) - 1
        bins[slot].append(i)
        space[slot] -= n
    return bins


def pack_tightly(sequences, target_padding=0.05):
    """Bins as long as the longest sequence keep attention as cheap as plain padding; when that leaves more than
    target_padding of the slots empty, longer bins (up to 2x) fill better. Shortest bins that reach the target win."""
    longest, total = max(map(len, sequences)), sum(map(len, sequences))
    best = None
    for scale in (1 + k / 16 for k in range(17)):
        bins = pack(sequences, int(longest * scale))
        padding = 1 - total / (len(bins) * max(sum(len(sequences[i]) for i in b) for b in bins))
        if best is None or padding < best[0]:
            best = (padding, bins)
        if padding <= target_padding:
            break
    return best[1]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [bins, bin_len]
    position_ids: torch.Tensor  # restart at 0 for every packed sequence (block-diagonal attention)
    last: torch.Tensor  # flat index of each reward row's last token: chosen rows, then rejected rows
    lm_index: torch.Tensor  # flat indices of positions that predict a teacher-answer token
    lm_target: torch.Tensor  # the teacher-answer tokens they predict
    margins: torch.Tensor | None
    n_pairs: int
    real_tokens: int


def collate(examples, pad_id, use_lm, with_margins):
    """One forward pass worth of examples: chosen, rejected and teacher-answer rows packed together."""
    sequences, lm_starts = [], {}
    for ex in examples:
        sequences += [ex.prompt[0] + ex.chosen, ex.prompt[1] + ex.rejected]
    for ex in examples if use_lm else []:
        if ex.teacher is not None:
            lm_starts[len(sequences)] = len(ex.teacher[0])
            sequences.append(ex.teacher[0] + ex.teacher[1])
    bins = pack_tightly(sequences)
    bin_len = max(sum(len(sequences[i]) for i in b) for b in bins)
    input_ids = torch.full((len(bins), bin_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), bin_len), dtype=torch.long)
    last, lm_index, lm_target = [0] * (2 * len(examples)), [], []
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            ids = sequences[i]
            input_ids[b, offset:offset + len(ids)] = torch.tensor(ids)
            position_ids[b, offset:offset + len(ids)] = torch.arange(len(ids))
            flat = b * bin_len + offset
            if i < 2 * len(examples):  # chosen row of example e is 2e, rejected 2e+1
                last[i // 2 + (len(examples) if i % 2 else 0)] = flat + len(ids) - 1
            else:  # position t predicts token t+1: the answer tokens from lm_starts[i] on
                start = lm_starts[i]
                lm_index.extend(range(flat + start - 1, flat + len(ids) - 1))
                lm_target.extend(ids[start:])
            offset += len(ids)
        # trailing padding: one more "sequence" of its own, invisible to the others
        position_ids[b, offset:] = torch.arange(bin_len - offset)
    margins = None
    if with_margins:
        margins = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    return Batch(input_ids, position_ids, torch.tensor(last), torch.tensor(lm_index, dtype=torch.long),
                 torch.tensor(lm_target, dtype=torch.long), margins, len(examples),
                 sum(len(s) for s in sequences))


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
