"""Conversational rows (TRL's `[{"role", "content"}, ...]`) rendered to text by a chat template.

Every conversational format becomes the standard one it mirrors, so the rest of the code sees text:
    messages                 -> completion {prompt, completion, segments}  (all assistant turns trained)
    prompt + completion      -> completion {prompt, completion}
    prompt                   -> prompt     {prompt}                        (ends with the generation prompt)
    prompt + chosen/rejected -> comparisons
    chosen/rejected (implicit prompt: the turns before the last reply) -> comparisons
A prompt is the conversation rendered with the generation prompt (`<|im_start|>assistant\\n`); a reply is
what the template adds for the assistant turn after it (content and end-of-turn token), so prompt + reply
is exactly the rendered conversation and a preference pair shares one rendered prompt.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")
SEGMENTS = "_segments"  # column of a rendered `messages` row: [(text, trained), ...]


def is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def conversational_columns(row: dict, columns) -> list[str]:
    return [c for c in columns if is_conversation(row.get(c))]


def with_system_prompt(rows: list[dict], fmt: str, system: str) -> list[dict]:
    """Prompt(-completion) rows as conversations that open with `system`: a text prompt becomes the user turn
    (its completion the assistant's), a conversational prompt without a system turn gets one."""
    def prompt(p):
        if is_conversation(p):
            return p if p[0].get("role") == "system" else [{"role": "system", "content": system}, *p]
        return [{"role": "system", "content": system}, {"role": "user", "content": str(p)}]

    def completion(c):
        return c if is_conversation(c) or c is None else [{"role": "assistant", "content": str(c).strip()}]

    return [{**r, "prompt": prompt(r["prompt"]), **({"completion": completion(r["completion"])}
                                                     if fmt == "completion" else {})} for r in rows]


class Renderer:
    """A chat template and the special tokens it may name (bos_token, eos_token, ...)."""

    def __init__(self, template: str, specials: dict, where: str):
        self.template, self.specials, self.where = template, dict(specials), where

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template  # compiles a template once

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                                add_generation_prompt=generation_prompt, **self.specials)
        except Exception as e:  # jinja2's TemplateError, or a template's own raise_exception(...)
            raise UserError(f"the chat template of {self.where} cannot render a conversation: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return rendered[0]

    def prompt(self, messages: list[dict]) -> str:
        return self.render(messages, generation_prompt=True)

    def reply(self, prompt: list[dict], reply: list[dict], row: str) -> tuple[str, str]:
        """(rendered prompt, what the template adds for `reply`): prompt + reply is the whole conversation."""
        head, whole = self.prompt(prompt), self.render(prompt + reply)
        if not whole.startswith(head):
            raise UserError(f"{row}: the chat template of {self.where} renders the conversation without its prompt "
                            "as a prefix, so the reply cannot be told apart; give data.chat_template: FILE.jinja")
        return head, whole[len(head):]

    def segments(self, messages: list[dict], row: str) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, trained) pieces: each assistant turn is trained."""
        out, done, whole, ok = [], "", self.render(messages), True
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head, reply = self.reply(messages[:i], [m], row)
                ok = ok and head.startswith(done)  # each turn extends the text of the turns before it
                out += [(head[len(done):], False), (reply, True)]
                done = head + reply
        out.append((whole[len(done):], False))
        if not (ok and whole.startswith(done)):
            raise UserError(f"{row}: the chat template of {self.where} renders earlier turns differently once later "
                            "ones follow, so the assistant turns cannot be marked; give data.chat_template: FILE.jinja")
        return [(text, trained) for text, trained in out if text]

    def generation_suffix(self) -> str:
        """What the generation prompt adds after a user turn (`<|im_start|>assistant\\n`)."""
        user = [{"role": "user", "content": "x"}]
        with_prompt, without = self.render(user, True), self.render(user)
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""


def from_tokenizer(tokenizer, where: str, template_file: str | None = None) -> Renderer:
    """The Renderer of a loaded tokenizer (its template and special tokens), or of `template_file`."""
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return renderer(tokenizer.chat_template, specials, where, template_file)


def renderer(template: str | None, specials: dict, where: str, template_file: str | None = None) -> Renderer:
    """The Renderer of `template_file` (data.chat_template) or else the tokenizer's own template."""
    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template {template_file} does not exist")
        template, where = path.read_text(encoding="utf-8"), str(path)
    if not template:
        raise UserError(f"the data is conversational but the tokenizer of {where} has no chat template; give one "
                        "with --set data.chat_template=FILE.jinja")
    return Renderer(template, specials, where)


def check_messages(messages, row: str, column: str, need_assistant: bool) -> list[dict]:
    """A list of {role, content} with known roles (and an assistant turn when one is needed)."""
    if not is_conversation(messages):
        raise UserError(f"{row}: '{column}' is {type(messages).__name__}, not a conversation; one file holds one "
                        "format (all rows conversational, or none)")
    for n, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise UserError(f"{row}: message {n} of '{column}' has the unknown role {m.get('role')!r} (roles: "
                            f"{', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{row}: message {n} of '{column}' has no text 'content'")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{row}: the conversation in '{column}' has no assistant turn to learn from")
    return messages


def _last_reply(messages: list[dict], row: str, column: str) -> tuple[list[dict], list[dict]]:
    """(the turns before the last assistant turn, that turn) of a whole conversation."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise UserError(f"{row}: the conversation in '{column}' has no turn before its assistant reply to prompt it")
    return messages[:last], messages[last:last + 1]


def _render_row(r: Renderer, row: dict, fmt: str, where: str) -> dict:
    """One conversational row as the standard row it mirrors (columns outside the format are kept)."""
    def msgs(col, need_assistant=False):
        return check_messages(row.get(col), where, col, need_assistant)

    if fmt == "messages":
        turns = msgs("messages", need_assistant=True)
        head, reply = _last_reply(turns, where, "messages")
        prompt, completion = r.reply(head, reply, where)
        return {"prompt": prompt, "completion": completion, SEGMENTS: r.segments(turns, where)}
    if fmt == "completion":
        prompt, completion = r.reply(msgs("prompt"), msgs("completion", True), where)
        return {"prompt": prompt, "completion": completion}
    if fmt == "prompt":
        return {"prompt": r.prompt(msgs("prompt"))}
    if fmt == "comparisons":
        prompt = msgs("prompt")
        head, chosen = r.reply(prompt, msgs("chosen", True), where)
        return {"prompt": head, "chosen": chosen, "rejected": r.reply(prompt, msgs("rejected", True), where)[1]}
    # implicit prompt (TRL): the turns before the last reply, the same in chosen and rejected
    prompt, chosen = _last_reply(msgs("chosen", True), where, "chosen")
    prompt_r, rejected = _last_reply(msgs("rejected", True), where, "rejected")
    if prompt_r != prompt:
        raise UserError(f"{where}: 'chosen' and 'rejected' differ before their last reply, so they share no prompt")
    head, chosen_text = r.reply(prompt, chosen, where)
    return {"prompt": head, "chosen": chosen_text, "rejected": r.reply(prompt, rejected, where)[1]}


# the standard format each conversational one becomes
STANDARD = {"messages": "completion", "completion": "completion", "prompt": "prompt", "comparisons": "comparisons",
            "hh": "comparisons"}


def render_rows(rows: list[dict], fmt: str, r: Renderer, source: str, split: str) -> list[dict]:
    """Every row of `rows` (conversational, format `fmt`) rendered to standard text rows."""
    out = []
    for i, row in enumerate(rows):
        rendered = _render_row(r, row, fmt, f"{split} row {i} of '{source}'")
        out.append({**{k: v for k, v in row.items() if k not in ("messages", "prompt", "completion", "chosen",
                                                                 "rejected")}, **rendered})
    return out
