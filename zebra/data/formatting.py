"""Chat formatting: conversations -> token ids + a mask of the assistant's tokens.

Two templates, chosen by name (METHOD §6):
- "tokenizer": the tokenizer's own chat template (default);
- "reference": the simplified Llama-3 template of the reference implementation,
  bos + `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>` per message, with no
  default system or date header.

Both go through the same path: render the conversation to text with a Jinja template, tokenise the text
without adding special tokens (exactly what `apply_chat_template(tokenize=True)` does), and mark as
assistant tokens those that overlap an assistant message's content in the rendered text, plus the
special end-of-turn token right after it (`<|im_end|>`, `<|eot_id|>`...) so a model trained on the mask
learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from zebra.errors import ConfigError, DataError

CHAT_TEMPLATES = ("tokenizer", "reference")
ROLES = ("system", "user", "assistant")

# The reference template, in the Jinja dialect `apply_chat_template` speaks (`trim` is Python's strip()).
REFERENCE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
REFERENCE_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class Formatted:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 on assistant content tokens and the end-of-turn token closing them


def check_chat_template(name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail early, naming the problem, when `name` cannot format chats with this tokenizer."""
    if name not in CHAT_TEMPLATES:
        raise ConfigError(f"unknown chat_template {name!r}; expected one of {CHAT_TEMPLATES}")
    tok_name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {tok_name!r} has no chat template; use chat_template='reference' "
            "(Llama-3 tokenizers) or a tokenizer that ships one"
        )
    if name == "reference":
        missing = [t for t in REFERENCE_SPECIAL_TOKENS if not _is_single_token(tokenizer, t)]
        if tokenizer.bos_token is None:
            missing.insert(0, "bos_token")
        if missing:
            raise ConfigError(
                f"chat_template='reference' is the Llama-3 template, but tokenizer {tok_name!r} lacks "
                f"its special tokens {missing}; use chat_template='tokenizer'"
            )


def _is_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    chat_template: str = "tokenizer",
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as the text the model reads."""
    _check_messages(messages)
    template = REFERENCE_TEMPLATE if chat_template == "reference" else None
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"a conversation must be a non-empty list of messages, got {messages!r:.200}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"each message must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}"
            )


def _assistant_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans of the assistant messages' content inside the rendered text.

    Searching from a cursor that also walks past the other messages keeps a reply that repeats an
    earlier message from matching the earlier copy. Templates that strip content (the reference) and
    templates that keep it verbatim (SmolLM2) both match: the stripped content is searched, then the
    span grows over the original's surrounding whitespace where the text kept it.
    """
    spans, cursor = [], 0
    for m in messages:
        content = m["content"].strip()
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            raise DataError(
                f"the chat template does not reproduce a {m['role']} message verbatim, so the assistant "
                f"tokens cannot be located (message starts {content[:60]!r})"
            )
        end = start + len(content)
        lead = m["content"][: len(m["content"]) - len(m["content"].lstrip())]
        trail = m["content"][len(m["content"].rstrip()) :]
        if lead and text[max(start - len(lead), 0) : start] == lead:
            start -= len(lead)
        if trail and text.startswith(trail, end):
            end += len(trail)
        cursor = end
        if m["role"] == "assistant":
            spans.append((start, end))
    return spans


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


def _mask_from_offsets(offsets, spans, ids, special) -> list[int]:
    """One pass over tokens and spans (both sorted by position)."""
    mask = [0] * len(ids)
    k = 0
    for i, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k == len(spans):
            break
        s, e = spans[k]
        if a < e and b > s and b > a:  # the token overlaps the content (zero-width tokens never do)
            mask[i] = 1
            # the end-of-turn token closing this reply: a special token right after its last token
            if b >= e and i + 1 < len(ids) and ids[i + 1] in special:
                mask[i + 1] = 1
    return mask


def _tokenize_segments(tokenizer, text, spans, special) -> Formatted:
    """Slow tokenizers have no offsets: tokenise the pieces between span edges separately."""
    ids, mask, pos = [], [], 0
    for s, e in spans:
        ids += tokenizer(text[pos:s], add_special_tokens=False)["input_ids"]
        mask += [0] * (len(ids) - len(mask))
        ids += tokenizer(text[s:e], add_special_tokens=False)["input_ids"]
        mask += [1] * (len(ids) - len(mask))
        rest = tokenizer(text[e:], add_special_tokens=False)["input_ids"]
        if rest and rest[0] in special:
            ids.append(rest[0])
            mask.append(1)
            e += len(tokenizer.convert_ids_to_tokens(rest[0]))
        pos = e
    ids += tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
    mask += [0] * (len(ids) - len(mask))
    return Formatted(ids, mask)


def format_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    chat_template: str = "tokenizer",
    add_generation_prompt: bool = False,
) -> list[Formatted]:
    """Token ids and assistant masks of many conversations (one batched tokeniser call when fast)."""
    check_chat_template(chat_template, tokenizer)
    texts = [render(tokenizer, m, chat_template, add_generation_prompt) for m in conversations]
    spans = [_assistant_spans(t, m) for t, m in zip(texts, conversations)]
    special = _special_ids(tokenizer)
    if not tokenizer.is_fast:
        return [_tokenize_segments(tokenizer, t, s, special) for t, s in zip(texts, spans)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        Formatted(ids, _mask_from_offsets(offs, sp, ids, special))
        for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans)
    ]


def format_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    chat_template: str = "tokenizer",
    add_generation_prompt: bool = False,
) -> Formatted:
    """Token ids and assistant mask of one conversation."""
    return format_conversations(tokenizer, [messages], chat_template, add_generation_prompt)[0]


def format_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    replies: list[list[dict]],
    chat_template: str = "tokenizer",
) -> list[tuple[Formatted, Formatted]]:
    """(prompt, reply) pairs tokenised separately, as TRL does for preference data.

    The prompt is rendered with the generation prompt, exactly as at inference; the reply is the rest of
    the rendered conversation. Tokenising the two texts apart keeps the prompt's tokens identical to the
    inference-time prompt even where BPE would merge across the boundary (SmolLM2 encodes a final
    "\n\n" as one token but "\n\nHello" as "\n", "\n", "Hello").
    """
    check_chat_template(chat_template, tokenizer)
    heads = format_conversations(tokenizer, prompts, chat_template, add_generation_prompt=True)
    special = _special_ids(tokenizer)
    texts, spans = [], []
    for p, r in zip(prompts, replies):
        head = render(tokenizer, p, chat_template, add_generation_prompt=True)
        full = render(tokenizer, p + r, chat_template)
        if not full.startswith(head):
            raise ConfigError(
                "the chat template renders a prompt differently with and without its reply, so the reply "
                "cannot be separated from it; use another chat_template or tokenizer"
            )
        n = len(head)
        texts.append(full[n:])
        spans.append([(a - n, b - n) for a, b in _assistant_spans(full, p + r) if a >= n])
    if tokenizer.is_fast:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        tails = [
            Formatted(ids, _mask_from_offsets(offs, sp, ids, special))
            for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans)
        ]
    else:
        tails = [_tokenize_segments(tokenizer, t, sp, special) for t, sp in zip(texts, spans)]
    return list(zip(heads, tails))


def format_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[Formatted]:
    """Plain-text documents: the tokenizer's usual special tokens, every token trainable."""
    enc = tokenizer(list(texts))["input_ids"]
    return [Formatted(ids, [1] * len(ids)) for ids in enc]
