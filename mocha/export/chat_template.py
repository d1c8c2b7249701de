"""Jinja chat templates generated from mocha's conversation templates (``mocha.text.conversation``).

``processor.apply_chat_template(messages)`` on an export renders the text ``build_prompt``
renders for the same turns (the prompt the model was trained on), so the template is generated
from the :class:`~mocha.text.conversation.Template` record, never written by hand. Messages use
transformers' format: ``{"role": "user" | "assistant" | "system", "content": str | [parts]}``
where a part is ``{"type": "image"}`` (rendered as ``"<image>\\n"``, the placeholder before the
question that mocha's prompts use) or ``{"type": "text", "text": ...}``. A leading system message
replaces the template's system prompt. The user turn already ends with the assistant role
(``"... ASSISTANT:"``), as in mocha; ``add_generation_prompt`` therefore adds nothing. BOS is
not part of the text: the processor adds it by the template's rule when it encodes.
"""

from __future__ import annotations

import json

from mocha.text.conversation import IMAGE_TOKEN, get_template

_CONTENT = """\
{%- macro render(content, sep) -%}
{%- if content is string -%}{{ content }}{%- else -%}
{%- for part in content -%}
{%- if part['type'] == 'image' -%}{{ IMAGE + sep }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
"""

#: ``render`` for a model trained with ``image_token_first`` (``mocha.text.conversation.image_first``):
#: a user turn's placeholders go first, then ``"\n"`` and the rest of its text, stripped.
_CONTENT_IMAGE_FIRST = """\
{%- macro render(content, sep) -%}
{%- if content is string -%}{%- set text = content -%}{%- else -%}
{%- set text = namespace(value='') -%}
{%- for part in content -%}
{%- if part['type'] == 'image' -%}{%- set text.value = text.value + IMAGE + sep -%}
{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}
{%- endfor -%}{%- set text = text.value -%}{%- endif -%}
{%- set count = text.count(IMAGE) -%}
{%- if count == 0 -%}{{ text }}
{%- else -%}{%- set rest = text.replace(IMAGE, '').strip() -%}
{{ IMAGE * count + ('\\n' + rest if rest else '') }}
{%- endif -%}
{%- endmacro -%}
"""


def _literal(value: str) -> str:
    """A jinja string literal (JSON escapes are valid jinja/Python escapes)."""
    return json.dumps(value)


def chat_template(name: str, image_token_first: bool = False) -> str:
    """The jinja chat template of mocha conversation template ``name`` (``phi``, ``vicuna_v1``,
    ``plain``); ``image_token_first``: user turns render as :func:`~mocha.text.conversation.image_first`
    makes them (the model's ``image_token_first``)."""
    spec = get_template(name)
    user, assistant = spec.roles
    header = (f"{{%- set IMAGE = {_literal(IMAGE_TOKEN)} -%}}\n"
              f"{{%- set system = namespace(text={_literal(spec.system)}) -%}}\n"
              + (_CONTENT_IMAGE_FIRST if image_token_first and not spec.is_plain else _CONTENT))
    if spec.is_plain:
        # plain: a user turn contributes only its image placeholders; a reply is learned with "\n".
        body = ("{%- for message in messages -%}\n"
                "{%- if message['role'] == 'user' -%}\n"
                "{%- if message['content'] is string -%}{{ IMAGE * (message['content'].count(IMAGE)) }}"
                "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ IMAGE }}"
                "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
                "{%- elif message['role'] == 'assistant' -%}"
                f"{{{{ render(message['content'], '') + {_literal(spec.turn_end)} }}}}"
                "{%- endif -%}\n"
                "{%- endfor -%}\n")
        return header + body
    body = ("{%- set turns = messages -%}\n"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system.text = render(messages[0]['content'], '') -%}{%- set turns = messages[1:] -%}"
            "{%- endif -%}\n"
            f"{{{{ system.text + {_literal(spec.sep)} }}}}\n"
            "{%- for message in turns -%}\n"
            "{%- if message['role'] == 'user' -%}"
            f"{{{{ {_literal(user + ': ')} + render(message['content'], '\\n') + "
            f"{_literal(spec.sep + assistant + ':')} }}}}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{{{ ' ' + render(message['content'], '') + {_literal(spec.turn_end)} }}}}"
            "{%- else -%}"
            "{{ raise_exception('roles must be system (first), user or assistant, got ' + message['role']) }}"
            "{%- endif -%}\n"
            "{%- endfor -%}\n")
    return header + body
