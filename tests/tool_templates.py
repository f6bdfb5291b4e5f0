"""Test tokenizers whose chat templates write tools the way Qwen2.5 and Llama 3.2 do.

The real templates ship inside the models' ``tokenizer_config.json``; no Qwen2.5 or
Llama 3.2 tokenizer is installed here (and tests download nothing), so these are minimal
templates written for the tests that render what the real ones render for tools:

* Qwen2.5: tools listed as JSON lines inside ``<tools></tools>`` in the system turn; an
  assistant call turn is ``<|im_start|>assistant`` then, per call,
  ``\\n<tool_call>\\n{"name": ..., "arguments": <arguments | tojson>}\\n</tool_call>``, then
  ``<|im_end|>``; consecutive ``tool`` messages share one user turn of
  ``\\n<tool_response>\\n...\\n</tool_response>`` blocks. ``<tool_call>`` and
  ``</tool_call>`` are added (non-special) tokens, as in Qwen2.5's vocabulary.
* Llama 3.2: ``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`` turns, an
  ``Environment: ipython`` system line when tools are given, the tools (``tojson(indent=4)``)
  in the first user turn, a call turn ``{"name": ..., "parameters": <arguments | tojson>}``
  (one call per turn: the template raises on more), results in ``ipython`` turns.
"""

from __future__ import annotations

import copy

QWEN25 = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{{- messages[0]['content'] if messages[0]['role'] == 'system' else "
    "'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user "
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) or "
    "(m.role == 'assistant' and not m.tool_calls) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for call in m.tool_calls %}"
    "{%- set f = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' "
    "+ f.arguments | tojson + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA32 = (
    "{{- bos_token }}"
    "{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- if tools is not none %}"
    "{%- if messages | length == 0 %}"
    "{{- raise_exception('Cannot put tools in the first user message when there is no "
    "first user message!') }}{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\\n\\n' }}"
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}"
    "{{- messages[0]['content'] | trim + '<|eot_id|>' }}"
    "{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if not (m.role == 'ipython' or m.role == 'tool' or 'tool_calls' in m) %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim "
    "+ '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in m %}"
    "{%- if not m.tool_calls | length == 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}"
    "{%- endif %}"
    "{%- set f = m.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + f.name + '\", \"parameters\": ' + f.arguments | tojson + '}' }}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def with_template(tokenizer, kind: str):
    """A copy of the tiny test ``tokenizer`` with the ``qwen2.5`` or ``llama3.2`` template
    and the tokens that template writes."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(tokenizer)
    if kind == "qwen2.5":
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in ("<tool_call>", "</tool_call>")])
        tok.chat_template = QWEN25
    elif kind == "llama3.2":
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")], special_tokens=True)
        tok.chat_template = LLAMA32
    else:
        raise ValueError(kind)
    return tok
