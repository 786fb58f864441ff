"""model.py -- the reward model: tokenization, backbone loading, RewardModel, scoring, save, load and HF export.

Copy this file with formats.py (its one companion, standard library only) to score with a trained reward model:

    from model import load_reward_model
    rm = load_reward_model("out/train/model")
    rm.score(["What is 2+2?"], ["4"])  # -> [reward]

What lives here: how a (prompt, answer) becomes token ids (render_prompt, render_answer, answer_ids, and fit: the
one rule for cutting a sequence to max_len, with CutCounts to count the cuts); load_backbone (a Hugging Face
causal-LM folder, a Hub id or a .gguf file; the demo's tiny student is built by demo/tiny_lm.py) and
checkpoint_activations (--gradient-checkpointing); RewardModel (the backbone, its LM head and a value head; rewards
of packed training batches and of padded scoring batches);
save_reward_model / load_reward_model (safetensors; with the linear head also a standard HF sequence classifier);
pick_device, the one --device check. Needs torch, transformers and safetensors.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from formats import UsageError, as_messages

ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
BYTE_TOKENIZER = "byte_tokenizer.json"  # marks a folder whose tokenizer is ByteTokenizer (no HF tokenizer files)


# ----------------------------------------------------------------------------------------------------------------
# tokenization: prompt messages + answer -> token ids, cut to max_len


class ByteTokenizer:
    """The built-in tiny student's tokenizer: UTF-8 bytes, plus pad and eos. Needs no files."""
    pad_token_id, eos_token_id, vocab_size = 256, 257, 260
    chat_template = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode(tokenizer, text):
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, messages):
    """Prompt messages -> the text the student sees before its answer (identical at train and eval time)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"\n\n{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in messages) \
        + "\n\nAssistant:"


def render_answer(tokenizer, answer):
    return answer.strip() if getattr(tokenizer, "chat_template", None) else " " + answer.strip()


def answer_ids(tokenizer, answer):
    """An answer -> its token ids as every sequence ends: rendered answer + eos (the token the reward is read at)."""
    return encode(tokenizer, render_answer(tokenizer, answer)) + [tokenizer.eos_token_id]


# How a sequence longer than max_len is cut: one rule for training (chosen, rejected and teacher-answer rows) and
# every command (train, eval, bon, serve's prompt/response form), in fit():
#  1. the prompt loses tokens from its start, down to its floor: its last min(len, max(32, max_len // 4),
#     max_len // 2) tokens (32 tokens hold the last words of the question plus any chat template's assistant
#     header; a quarter of the budget keeps more of it for long --max-len; half the budget at most leaves the rest
#     to the answer);
#  2. only then the answer loses its end, EOS included. An answer cut at its end must not pretend to be complete:
#     its sequence stops at the last token that fits, with no EOS, and the reward is read there. Reward rows keep
#     the answer's beginning rather than its end: the question then runs straight into the answer, as when it
#     was written (cutting the start would glue the question to a mid-sentence fragment); the teacher answer (the
#     LM target) must stay the continuation of its prompt anyway, so one rule serves both kinds; and the
#     decisive part of many answers (a refusal, a direct answer) comes first.
CUT_KINDS = ("prompt_left", "prompt_min", "answer_end")


def prompt_floor(prompt_len, max_len):
    """How many of the prompt's last tokens every sequence keeps (all of them for a short prompt)."""
    return min(prompt_len, max(32, max_len // 4), max_len // 2)


def fit(prompt, answer, max_len):
    """Cut prompt + answer ids to max_len tokens (see the rule above) -> (prompt, answer, cut kind): None when
    nothing was cut; 'prompt_left': the prompt lost its start, the answer is whole; 'prompt_min': the prompt was cut
    to its floor and the answer lost its end; 'answer_end': the answer lost its end, the (short) prompt is whole."""
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer, None
    floor = prompt_floor(len(prompt), max_len)
    if len(answer) <= max_len - floor:
        return prompt[len(prompt) - (max_len - len(answer)):], answer, "prompt_left"
    return (prompt[len(prompt) - floor:], answer[:max_len - floor],
            "prompt_min" if floor < len(prompt) else "answer_end")


@dataclass
class CutCounts:
    """How the sequences of one kind were cut to --max-len. Each sequence counts once, under exactly one of
    whole, prompt_left, prompt_min, answer_end (they add up to sequences); most_prompt_lost overlaps them."""
    sequences: int = 0
    whole: int = 0
    prompt_left: int = 0  # the prompt lost tokens from its start; the whole answer kept
    prompt_min: int = 0  # the prompt kept only its floor (its last tokens) and the answer lost its end and EOS
    answer_end: int = 0  # the answer lost its end and EOS; the prompt, shorter than its floor, kept whole
    most_prompt_lost: int = 0  # kept under half of the prompt's tokens

    def add(self, kind, kept_prompt, prompt_len):
        self.sequences += 1
        setattr(self, kind or "whole", getattr(self, kind or "whole") + 1)
        self.most_prompt_lost += kept_prompt < prompt_len / 2

    def summary(self, what):
        return (f"{self.sequences} {what}: {self.whole} whole, {self.prompt_left} prompt cut from the left, "
                f"{self.prompt_min} prompt cut to its floor + answer end cut, {self.answer_end} answer end cut "
                f"(prompt whole); {self.most_prompt_lost} kept under half of their prompt")


# ----------------------------------------------------------------------------------------------------------------
# backbone


def pick_device(device):
    """--device (auto, cpu, cuda, cuda:1, ...) -> the device to use, or a one-line error if this machine lacks it."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device={device!r} is not a device: auto, cpu, cuda, cuda:1, ...") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={device} but CUDA is not available here (torch {torch.__version__}); "
                         "use --device=cpu or --device=auto")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def is_hub_id(name):
    """'org/name' that is not a local path: a Hugging Face Hub model id, fetched into transformers' cache."""
    return not os.path.exists(name) and not name.endswith(".gguf") and \
        re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def load_backbone(name, layers=0, max_len=1024):
    """A local HF causal-LM folder, a .gguf file (or a folder holding one) or a Hub id (org/name) -> (causal LM,
    tokenizer), cut to its first `layers` transformer layers when layers > 0. (The demo's 'tiny' students:
    demo/tiny_lm.py.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    if os.path.exists(os.path.join(name, BYTE_TOKENIZER)):  # a byte-tokenizer folder: the demo's tiny student
        tokenizer = ByteTokenizer()
        lm = LlamaForCausalLM.from_pretrained(name, dtype=torch.float32)
        lm.config.max_position_embeddings = max(max_len, lm.config.max_position_embeddings)
    else:
        folder, gguf = name, {}
        if name.endswith(".gguf"):
            folder, gguf = os.path.dirname(name) or ".", {"gguf_file": os.path.basename(name)}
        elif os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
            ggufs = [f for f in os.listdir(name) if f.endswith(".gguf")]
            gguf = {"gguf_file": ggufs[0]} if len(ggufs) == 1 else {}
        hub = not os.path.isdir(folder) and is_hub_id(name)  # e.g. Qwen/Qwen2.5-0.5B: transformers' own cache
        if not os.path.isdir(folder) and not hub:
            raise UsageError(f"--model {name!r} is not a local model folder, a .gguf file or a "
                             "Hugging Face id (org/name)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
        except OSError as e:
            if not hub:
                raise
            raise UsageError(f"--model={name} is not a local path, and loading it from the Hugging Face Hub "
                             f"failed (offline, or no such model?): {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {name!r} has no eos token")
    return cut_layers(lm, layers), tokenizer


def cut_layers(lm, layers):
    """Keep only the first `layers` transformer layers of a causal LM (0 = all)."""
    if layers:
        lm.model.layers = lm.model.layers[:layers]
        lm.config.num_hidden_layers = len(lm.model.layers)
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[:layers]
    return lm


def checkpoint_activations(lm):
    """--gradient-checkpointing: transformers' own, each decoder layer recomputed in backward (non-reentrant: works
    with packed position_ids, frozen LoRA weights and DDP). Named activation_checkpointing_enable since 5.x."""
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attention_key_cost(lm):
    """What attending to one more key costs against one more token through the weights, per layer and forward pass:
    4 x hidden FLOPs (a score and its share of the weighted sum) against 2 x the layer's parameters (about 1/3000
    for SmolLM2-135M). batches.collate's layout="auto" and RewardModel.score weigh prefix sharing with it."""
    layer = lm.model.layers[0]
    return 2 * lm.config.hidden_size / sum(p.numel() for p in layer.parameters())


def layout_cost(rows, row_len, key_cost):
    """The forward cost of rows x row_len slots in token-equivalents: every slot (padding too) goes through the
    weights and attends to every slot of its row (SDPA with a dense mask computes the masked scores too). Sharing a
    prompt saves its copies but makes longer rows: it pays only where the prompts are long enough."""
    return rows * row_len * (1 + key_cost * row_len)


def prefix_sharing_mask(sequence_ids, branch_ids, implementation, dtype=torch.float32):
    """The attention mask of packed sequences with shared prompts ([rows, slots] ids, see batches.Batch): a slot
    sees the earlier slots of its own sequence that are its prompt (branch 0) or its own answer (same branch).
    -> what the model's attention implementation takes: a bool [rows, 1, slots, slots] mask (sdpa), an additive
    one (eager), or FlexAttention's BlockMask (flex_attention: the blocks nobody sees are skipped)."""
    rows, slots = sequence_ids.shape
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def visible(b, h, q, k):
            return (k <= q) & (sequence_ids[b, q] == sequence_ids[b, k]) & (
                (branch_ids[b, k] == 0) | (branch_ids[b, k] == branch_ids[b, q]))
        return create_block_mask(visible, rows, None, slots, slots, device=sequence_ids.device)
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"shared prompts need the sdpa, eager or flex_attention attention implementation, this "
                         f"model uses {implementation!r}: train with --share-prompts=off")
    causal = torch.ones(slots, slots, dtype=torch.bool, device=sequence_ids.device).tril()
    branch_k = branch_ids[:, None, :]
    mask = causal & (sequence_ids[:, :, None] == sequence_ids[:, None, :]) & (
        (branch_k == 0) | (branch_k == branch_ids[:, :, None]))
    mask = mask[:, None]
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def predicting_slots(start, end, before):
    """The flat slots that predict the tokens in slots start..end-1: `before` for the first (the slot just before it,
    or the last slot of a shared prompt), then each token's predecessor; none for an empty span."""
    return [before] + list(range(start, end - 1)) if end > start else []


def answer_positions(spans, flat_ids, device):
    """Answers laid out in flat token slots -> (answer_index, answer_target, answer_row) for RewardModel.reward.
    spans[k] = (start, end, before) of sequence k's answer: its tokens flat_ids[start:end], the first one predicted at
    slot `before` (the slot just before it, or the last slot of a shared prompt), each later one at the slot before."""
    index, target, row = [], [], []
    for k, (start, end, before) in enumerate(spans):  # an answer cut away adds nothing
        index += predicting_slots(start, end, before)
        target += flat_ids[start:end].tolist()
        row += [k] * (end - start)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(index), as_tensor(target), as_tensor(row)


LIKELIHOOD_KEY = "likelihood_weight"  # its name in value_head.safetensors
LIKELIHOOD_CHUNK = 1024  # answer tokens per LM-head product when the likelihood term is read (bounds its memory)


class RewardModel(nn.Module):
    """A causal LM whose backbone also feeds a value head; reward = value head(hidden state of the last token).

    With likelihood=True the reward also reads what the student knew before any preference data: reward = value
    head + w x log p_ref(answer | prompt), the sum of the log-probabilities the reference LM gives the answer's tokens
    (eos included). The reference is a frozen copy of the student as it was given (`reference`; by default a copy of
    `lm` made here), because training the reward moves the backbone away from what it knew (measured in the
    simulated world: the trained student's own likelihood fell from 100% to 42% on natural pairs). w is one learned
    scalar (likelihood_weight, from 0), so the teacher's pairs decide how much that knowledge counts, and the value
    head, which sees the answer's style, learns what the likelihood says about style rather than content (a longer
    answer is less likely whatever it says). Cost: one more forward pass of the frozen copy (no backward, no optimizer
    state) and its weights in memory and in the saved folder."""

    def __init__(self, lm, tokenizer, head="mlp", dropout=0.1, max_len=1024, likelihood=False, reference=None):
        super().__init__()
        self.lm, self.tokenizer, self.head_kind, self.dropout = lm, tokenizer, head, dropout
        self.likelihood = likelihood
        if likelihood:
            self.likelihood_weight = nn.Parameter(torch.zeros(1))  # 1-d: FSDP2 shards parameters along dim 0
            self.reference = copy.deepcopy(lm) if reference is None else reference
            self.reference.requires_grad_(False).eval()
        self.max_len = max_len  # tokens per scored sequence unless a call says otherwise (saved in rmd.json)
        hidden = lm.config.hidden_size
        if head == "mlp":
            self.value_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1024), nn.ReLU(),
                                            nn.Linear(1024, 1))
        else:
            self.value_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1, bias=False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def train(self, mode=True):
        super().train(mode)
        if self.likelihood:
            self.reference.eval()  # frozen: no dropout either
        return self

    def hidden(self, input_ids, position_ids=None, attention_mask=None):
        return self.lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state

    def forward(self, batch):
        """Packed batch (batches.Batch: input_ids, position_ids, last, lm_index) -> (rewards [2B]: chosen then
        rejected, hidden states of the positions that predict a teacher-answer token [n, H])."""
        mask = None
        if batch.sequence_ids is not None:  # shared prompts: the mask says who sees whom
            mask = prefix_sharing_mask(batch.sequence_ids, batch.branch_ids, self.lm.config._attn_implementation,
                                       self.lm.dtype)
        hidden = self.hidden(batch.input_ids, batch.position_ids, mask).flatten(0, 1)
        answers = (batch.answer_index, batch.answer_target, batch.answer_row)
        return self.reward(hidden, batch.last, answers, (batch.input_ids, batch.position_ids, mask)), \
            hidden[batch.lm_index]

    def reward(self, hidden, last, answers=None, inputs=None):
        """Flat hidden states [slots, H] -> the reward of each sequence: the value head at its last token (flat
        index `last`), plus with likelihood on w x the reference LM's log-likelihood of its answer tokens. answers:
        (answer_target's flat predicting positions, answer_target, the sequence each belongs to); inputs: the pass's
        (input_ids, position_ids, attention mask), which the reference reads again."""
        rewards = self.value_head(hidden[last]).squeeze(-1).float()
        if not self.likelihood:
            return rewards
        if answers is None or answers[0] is None:
            raise ValueError("this reward model's reward includes the answer's likelihood: it needs to know where each "
                             "answer starts (score prompt and answer apart)")
        return rewards + self.likelihood_weight * self.answer_loglik(inputs, *answers, len(rewards))

    @torch.compiler.disable  # a loop as long as the batch's answers: eager, not a graph recompiled per length
    @torch.no_grad()
    def answer_loglik(self, inputs, index, target, row, n_rows):
        """Sum of log p_ref(token) over each sequence's answer tokens: the reference LM's forward pass on the same
        inputs, its LM head on the positions that predict them, LIKELIHOOD_CHUNK tokens at a time; no gradient."""
        input_ids, position_ids, mask = inputs
        hidden = self.reference.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                                      use_cache=False).last_hidden_state.flatten(0, 1)
        head, out = self.reference.get_output_embeddings(), torch.zeros(n_rows, device=hidden.device)
        for k in range(0, len(index), LIKELIHOOD_CHUNK):
            logp = head(hidden[index[k:k + LIKELIHOOD_CHUNK]]).float().log_softmax(-1)
            out.index_add_(0, row[k:k + LIKELIHOOD_CHUNK],
                           logp.gather(-1, target[k:k + LIKELIHOOD_CHUNK, None]).squeeze(-1))
        return out

    def rewards(self, input_ids, attention_mask, answer_starts=None):
        """Padded batch (either padding side) -> reward at each row's last real token. answer_starts: where each
        row's answer starts, counted in its real tokens (needed with likelihood on)."""
        attention_mask = attention_mask.long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.hidden(input_ids, position_ids, attention_mask)
        width = input_ids.shape[1]
        positions = torch.arange(width, device=input_ids.device)
        last = (attention_mask * positions).argmax(-1) + width * torch.arange(len(input_ids), device=input_ids.device)
        answers = None
        if answer_starts is not None:  # the answer's tokens: from its start to the row's last real token
            first = attention_mask.argmax(-1) + width * torch.arange(len(input_ids), device=input_ids.device)
            spans = [(int(f) + s, int(e) + 1, int(f) + s - 1) for f, s, e in zip(first, answer_starts, last)]
            answers = answer_positions(spans, input_ids.flatten(), input_ids.device)
        return self.reward(hidden.flatten(0, 1), last, answers, (input_ids, position_ids, attention_mask))

    def tokens(self, prompt, answer, max_len=None, cuts=None):
        """(prompt, answer) -> token ids exactly as training builds them: rendered prompt + answer + eos, cut by
        fit(); the cut is counted in cuts (a CutCounts) when given."""
        p, a = self.pieces(prompt, answer, max_len, cuts)
        return p + a

    def pieces(self, prompt, answer, max_len=None, cuts=None):
        """(prompt, answer) -> (prompt ids, answer ids) as cut by fit() (see tokens)."""
        prompt_ids = encode(self.tokenizer, render_prompt(self.tokenizer, as_messages(prompt, "prompt")))
        p, a, kind = fit(prompt_ids, answer_ids(self.tokenizer, answer), max_len or self.max_len)
        if cuts is not None:
            cuts.add(kind, len(p), len(prompt_ids))
        return p, a

    @functools.cached_property
    def answer_marker(self):
        """What render_prompt writes after the last message's content, right before an answer (a chat template's
        end of turn and assistant header, or rmd's "\\n\\nAssistant:"): found once per model."""
        sentinel = "\x00"
        return render_prompt(self.tokenizer, [{"role": "user", "content": sentinel}]).split(sentinel)[-1]

    def text_tokens(self, text, max_len=None):
        """An already formatted full text (prompt + response) -> (ids + eos, where the answer starts in them or None
        when the text has no assistant turn), keeping the text's end when it is over max_len; trailing pad/eos text
        is dropped first (OpenRLHF's queries carry it). The answer starts after the last generation prompt (what
        render_prompt writes before an answer); the likelihood term needs it."""
        tok = self.tokenizer
        if not isinstance(tok, ByteTokenizer):
            for special in (tok.pad_token, tok.eos_token):
                while special and text.endswith(special):
                    text = text[:-len(special)]
        at = text.rfind(self.answer_marker)
        at = None if at < 0 else at + len(self.answer_marker)
        if isinstance(tok, ByteTokenizer):
            ids = tok.encode(text)
            start = None if at is None else len(text[:at].encode("utf-8"))
        else:
            encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            start = None if at is None else next((i for i, (begin, _) in enumerate(offsets) if begin >= at), len(ids))
        keep = (max_len or self.max_len) - 1
        if start is not None:  # the first answer token kept needs one before it to predict it
            start = max(1, start - max(0, len(ids) - keep))
        return ids[-keep:] + [tok.eos_token_id], start

    @torch.no_grad()
    def sequence_rewards(self, sequences, batch_size=32, padding_side="right", answer_starts=None):
        """Rewards of token-id sequences, in input order; batched by length so little padding is computed.
        answer_starts: where each sequence's answer starts (needed with likelihood on; see text_tokens)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = [0.0] * len(sequences)
        for k in range(0, len(order), batch_size):
            chunk = order[k:k + batch_size]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                span = slice(width - len(sequences[i]), width) if padding_side == "left" else \
                    slice(0, len(sequences[i]))
                ids[row, span], mask[row, span] = torch.tensor(sequences[i]), 1
            starts = None if answer_starts is None else [answer_starts[i] for i in chunk]
            for i, reward in zip(chunk, self.rewards(ids.to(device), mask.to(device), starts).tolist()):
                out[i] = reward
        self.train(was_training)
        return out

    def score(self, prompts, answers, batch_size=32, max_len=None, padding_side="right", cuts=None):
        """Rewards for (prompt, answer) pairs; prompts are strings or message lists, as in the training data. The
        cuts to max_len are counted in cuts (a CutCounts) when given. Answers to the same prompt share it (see
        piece_rewards)."""
        pieces = [self.pieces(p, a, max_len, cuts) for p, a in zip(prompts, answers, strict=True)]
        return self.piece_rewards(pieces, batch_size, padding_side)

    @torch.no_grad()
    def piece_rewards(self, pieces, batch_size=32, padding_side="right"):
        """Rewards of (prompt ids, answer ids), in input order. Up to batch_size answers to the same (cut) prompt
        share one copy of it in a row of their own when layout_cost says that is cheaper than a row each; the rest
        are scored as whole sequences (sequence_rewards)."""
        by_prompt, key_cost = {}, attention_key_cost(self.lm)
        for i, (prompt, _) in enumerate(pieces):
            by_prompt.setdefault(tuple(prompt), []).append(i)
        shared, alone = [], []
        for prompt, members in by_prompt.items():
            for k in range(0, len(members), batch_size):
                chunk = members[k:k + batch_size]
                lengths = [len(prompt) + len(pieces[i][1]) for i in chunk]
                row = len(prompt) + sum(n - len(prompt) for n in lengths)
                if len(chunk) > 1 and layout_cost(1, row, key_cost) < sum(layout_cost(1, n, key_cost) for n in lengths):
                    shared.append(chunk)
                else:
                    alone += chunk
        out = [0.0] * len(pieces)
        for i, reward in zip(alone, self.sequence_rewards([pieces[i][0] + pieces[i][1] for i in alone], batch_size,
                                                          padding_side, [len(pieces[i][0]) for i in alone])):
            out[i] = reward
        for i, reward in self.shared_rewards(pieces, shared, batch_size, padding_side):
            out[i] = reward
        return out

    def shared_rewards(self, pieces, chunks, batch_size, padding_side):
        """Rows of one prompt + its answers (chunks: lists of indices into pieces that share a prompt), as many rows
        per forward pass as hold up to batch_size answers -> (index, reward) of every answer."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        row_len = lambda chunk: len(pieces[chunk[0]][0]) + sum(len(pieces[i][1]) for i in chunk)  # noqa: E731
        chunks = sorted(chunks, key=row_len)
        out, k = [], 0
        while k < len(chunks):
            rows = [chunks[k]]
            while k + len(rows) < len(chunks) and sum(map(len, rows)) + len(chunks[k + len(rows)]) <= batch_size:
                rows.append(chunks[k + len(rows)])
            k += len(rows)
            width = max(map(row_len, rows))
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            positions, sequence_ids, branch_ids = torch.zeros_like(ids), torch.full_like(ids, 2), torch.zeros_like(ids)
            last, spans = [], []
            for r, chunk in enumerate(rows):
                prompt = pieces[chunk[0]][0]
                start = width - row_len(chunk) if padding_side == "left" else 0
                ids[r, start:start + len(prompt)] = torch.tensor(prompt)
                positions[r, start:start + len(prompt)] = torch.arange(len(prompt))
                sequence_ids[r, start:start + row_len(chunk)] = 1
                cursor = start + len(prompt)
                for branch, i in enumerate(chunk, 1):
                    answer = pieces[i][1]
                    spans.append((r * width + cursor, r * width + cursor + len(answer),
                                  r * width + start + len(prompt) - 1))  # its first token: from the prompt's end
                    ids[r, cursor:cursor + len(answer)] = torch.tensor(answer)
                    positions[r, cursor:cursor + len(answer)] = torch.arange(len(prompt), len(prompt) + len(answer))
                    branch_ids[r, cursor:cursor + len(answer)] = branch
                    cursor += len(answer)
                    last.append(r * width + cursor - 1)
            mask = prefix_sharing_mask(sequence_ids.to(device), branch_ids.to(device),
                                       self.lm.config._attn_implementation, self.lm.dtype)
            hidden = self.hidden(ids.to(device), positions.to(device), mask).flatten(0, 1)
            answers = answer_positions(spans, ids.flatten(), device) if self.likelihood else None
            rewards = self.reward(hidden, torch.tensor(last, device=device), answers,
                                  (ids.to(device), positions.to(device), mask))
            out += zip([i for chunk in rows for i in chunk], rewards.tolist())
        self.train(was_training)
        return out


# ----------------------------------------------------------------------------------------------------------------
# saving and loading (safetensors only)


def export_pad_id(tokenizer, vocab_rows):
    """A pad id that never occurs in a real sequence: HF's sequence-classification head reads the reward at the
    rightmost token that is not config.pad_token_id, so pad == eos (answers end with eos) would read the wrong one.
    Keeps the tokenizer's pad if it is distinct from eos; else an unused special token; else a spare embedding row."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return pad
    probe = [{"role": "user", "content": "hi"}]
    used = set(encode(tokenizer, render_prompt(tokenizer, probe) + render_answer(tokenizer, "ok"))) | {eos}
    used.add(getattr(tokenizer, "bos_token_id", None))
    special = list(getattr(tokenizer, "all_special_ids", [])) + sorted(getattr(tokenizer, "added_tokens_decoder", {}))
    spare = [i for i in special if i not in used]
    if spare:
        return spare[0]
    return len(tokenizer) if vocab_rows > len(tokenizer) else None


def save_reward_model(model: RewardModel, path, weights=None):
    """Safetensors folder for load_reward_model. With the linear head (and no likelihood term, which a sequence
    classifier cannot add) it is also a standard HF sequence classifier:
    AutoModelForSequenceClassification.from_pretrained(path) gives the same rewards (the value head is `score.weight`
    in model.safetensors; the config's pad_token_id never occurs in real text, see export_pad_id; feed it what rmd
    feeds: rendered prompt + answer + eos). The LM head stays in the folder for load_reward_model (HF warns that it
    is unused)."""
    from safetensors.torch import load_file, save_file
    os.makedirs(path, exist_ok=True)
    quantizer = getattr(model.lm, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":  # GGUF weights were dequantized to float when loaded
        model.lm.hf_quantizer = None  # else save_pretrained refuses ("quantized with gguf, not serializable")
        if getattr(model.lm.config, "quantization_config", None) is not None:
            del model.lm.config.quantization_config
    # weights: under FSDP, full_state(model), gathered by every process (the model's own tensors are shards)
    lm_weights = None if weights is None else {k[3:]: v for k, v in weights.items() if k.startswith("lm.")}
    model.lm.save_pretrained(path, safe_serialization=True, state_dict=lm_weights)
    weights = model.state_dict() if weights is None else weights
    head = {k[11:]: v.detach().contiguous().cpu() for k, v in weights.items() if k.startswith("value_head.")}
    if model.likelihood:  # the likelihood term's weight travels with the head, its frozen reference LM beside it
        head[LIKELIHOOD_KEY] = weights["likelihood_weight"].detach().reshape(1).contiguous().cpu()
        save_file(reference_weights(weights), os.path.join(path, REFERENCE_FILE), metadata={"format": "pt"})
    save_file(head, os.path.join(path, "value_head.safetensors"))
    tokenizer, hf_export = model.tokenizer, None
    if model.head_kind == "linear" and not model.likelihood:  # a sequence classifier cannot add the likelihood
        pad = export_pad_id(tokenizer, model.lm.get_input_embeddings().weight.shape[0])
        arch = type(model.lm).__name__.replace("ForCausalLM", "ForSequenceClassification")
        import transformers
        if pad is not None and hasattr(transformers, arch):
            weights = os.path.join(path, "model.safetensors")
            if os.path.exists(weights):
                tensors = load_file(weights)
                tensors["score.weight"] = head["1.weight"]
                save_file(tensors, weights, metadata={"format": "pt"})
            else:  # sharded: the score in a file of its own, listed in the index
                save_file({"score.weight": head["1.weight"]}, os.path.join(path, "score.safetensors"),
                          metadata={"format": "pt"})
                with open(os.path.join(path, "model.safetensors.index.json")) as f:
                    index = json.load(f)
                index["weight_map"]["score.weight"] = "score.safetensors"
                with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                    json.dump(index, f, indent=2)
            config = copy.deepcopy(model.lm.config)
            config.architectures, config.num_labels, config.pad_token_id = [arch], 1, pad
            config.save_pretrained(path)
            hf_export = {"architecture": arch, "pad_token_id": pad}
            if not isinstance(tokenizer, ByteTokenizer) and tokenizer.pad_token_id != pad:
                tokenizer = copy.deepcopy(tokenizer)  # so that tokenizer(..., padding=True) pads with that id
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer.save_pretrained(path)
    meta = {"head": model.head_kind, "dropout": model.dropout, "max_len": model.max_len, "likelihood": model.likelihood,
            "tokenizer": "bytes" if isinstance(model.tokenizer, ByteTokenizer) else "hf", "format": "rmd-1",
            "hf_sequence_classification": hf_export}
    with open(os.path.join(path, "rmd.json"), "w") as f:
        json.dump(meta, f, indent=2)


REFERENCE_FILE = "reference.safetensors"  # the likelihood term's frozen reference LM, in a reward-model folder


def reference_weights(weights):
    """The reference LM's tensors of a RewardModel state dict, each storage once (a tied LM head is its embedding)."""
    out, seen = {}, set()
    for name, tensor in weights.items():
        if name.startswith("reference.") and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name[len("reference."):]] = tensor.detach().contiguous().cpu()
    return out


def load_reference(reference, path):
    """reference_weights' file into `reference` (the trained LM's architecture); a tied weight comes with its twin.
    Anything else missing or left over is an error: a reward depends on every one of them."""
    from safetensors.torch import load_file
    missing, unexpected = reference.load_state_dict(load_file(path), strict=False)
    loaded = {p.data_ptr() for n, p in reference.named_parameters() if n not in missing}
    untied = [n for n, p in reference.named_parameters(remove_duplicate=False) if n in missing and
              p.data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"{path}: not the reference LM of this reward model (missing {untied[:3]}, unexpected "
                         f"{unexpected[:3]})")


def load_reward_model(path, device="cpu") -> RewardModel:
    """A reward-model folder written by `rmd.py train` -> RewardModel (eval mode) with .score(prompts, answers)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    meta_path = os.path.join(path, "rmd.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path}: not an rmd reward-model folder (no rmd.json)")
    with open(meta_path) as f:
        meta = json.load(f)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = ByteTokenizer() if meta["tokenizer"] == "bytes" else AutoTokenizer.from_pretrained(path)
    model = RewardModel(lm, tokenizer, head=meta["head"], dropout=meta["dropout"], max_len=meta["max_len"],
                        likelihood=meta.get("likelihood", False))  # its reference: a copy of lm, loaded below
    head = load_file(os.path.join(path, "value_head.safetensors"))
    if model.likelihood:
        model.likelihood_weight.data.copy_(head.pop(LIKELIHOOD_KEY))
        load_reference(model.reference, os.path.join(path, REFERENCE_FILE))
    model.value_head.load_state_dict(head)
    return model.to(device).eval()
